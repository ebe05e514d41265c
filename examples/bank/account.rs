//! The account aggregate: its state, rebuilt by applying its events in
//! order, and its commands, validated against that state.
//!
//! Invariants: `decide` only emits events that keep the balance at zero or
//! above (a withdrawal or debit never exceeds the balance), so an account
//! whose events were all decided here never goes negative; `apply` never
//! refuses an event (events are facts).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::event::Event;

/// Where an account is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Status {
    /// No `Opened` event yet.
    #[default]
    Unopened,
    /// Open: takes deposits, withdrawals and transfers.
    Open,
    /// Closed: takes nothing but refunds of its own transfers.
    Closed,
}

/// An account's state as of some version of its partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The account id (the records' key).
    pub id: String,
    /// Open or not.
    pub status: Status,
    /// Cents.
    pub balance: i64,
    /// Transfers debited here and not refunded, by transfer id: what a
    /// refund may give back.
    pub debits: BTreeMap<String, i64>,
    /// Transfers credited here, so a repeated credit changes nothing.
    pub credited: BTreeSet<String>,
}

/// What a client asks of one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open the account.
    Open,
    /// Put money in.
    Deposit {
        /// Cents, positive.
        amount: i64,
    },
    /// Take money out, if the balance covers it.
    Withdraw {
        /// Cents, positive.
        amount: i64,
    },
    /// A transfer's debit, if the balance covers it.
    Debit {
        /// The transfer's id.
        transfer_id: String,
        /// The account to credit.
        to: String,
        /// Cents, positive.
        amount: i64,
    },
    /// A transfer's credit (once per transfer id).
    Credit {
        /// The transfer's id.
        transfer_id: String,
        /// The debited account.
        from: String,
        /// Cents, positive.
        amount: i64,
    },
    /// Give back a debited transfer (once per transfer id).
    Refund {
        /// The transfer's id.
        transfer_id: String,
    },
    /// Close the account; its balance must be zero.
    Close,
}

/// Why a command was refused. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// `Open` on an account that was opened before.
    AlreadyOpened,
    /// The account is not open (never opened, or closed).
    NotOpen {
        /// Its status.
        status: Status,
    },
    /// An amount of zero or less.
    InvalidAmount {
        /// What was asked.
        amount: i64,
    },
    /// The balance does not cover the amount.
    InsufficientFunds {
        /// The balance.
        balance: i64,
        /// What was asked.
        amount: i64,
    },
    /// `Close` with money in the account.
    NonZeroBalance {
        /// The balance.
        balance: i64,
    },
    /// `Refund` of a transfer this account has no open debit for.
    UnknownTransfer {
        /// The transfer's id.
        transfer_id: String,
    },
    /// Forced by a test hook (see [`super::saga::Fault`]).
    Forced,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::AlreadyOpened => write!(f, "the account is already opened"),
            Rejection::NotOpen { status } => write!(f, "the account is not open ({status:?})"),
            Rejection::InvalidAmount { amount } => write!(f, "invalid amount {amount}: must be positive"),
            Rejection::InsufficientFunds { balance, amount } => {
                write!(f, "insufficient funds: balance {balance}, asked {amount}")
            }
            Rejection::NonZeroBalance { balance } => write!(f, "cannot close with a balance of {balance}"),
            Rejection::UnknownTransfer { transfer_id } => write!(f, "no open debit for transfer {transfer_id}"),
            Rejection::Forced => write!(f, "refused by a test hook"),
        }
    }
}

impl std::error::Error for Rejection {}

impl Account {
    /// An account with no events applied.
    pub fn new(id: impl Into<String>) -> Account {
        Account {
            id: id.into(),
            status: Status::Unopened,
            balance: 0,
            debits: BTreeMap::new(),
            credited: BTreeSet::new(),
        }
    }

    /// Applies one of this account's events.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Opened => self.status = Status::Open,
            Event::Deposited { amount } => self.balance += amount,
            Event::Withdrawn { amount } => self.balance -= amount,
            Event::TransferDebited { transfer_id, amount, .. } => {
                self.balance -= amount;
                self.debits.insert(transfer_id.clone(), *amount);
            }
            Event::TransferCredited { transfer_id, amount, .. } => {
                self.balance += amount;
                self.credited.insert(transfer_id.clone());
            }
            Event::TransferRefunded { transfer_id, amount } => {
                self.balance += amount;
                self.debits.remove(transfer_id);
            }
            Event::Closed => self.status = Status::Closed,
        }
    }

    /// The events `command` makes, or why it is refused. An empty list
    /// means it already happened (a repeated credit or refund).
    pub fn decide(&self, command: &Command) -> Result<Vec<Event>, Rejection> {
        match command {
            Command::Open if self.status == Status::Unopened => Ok(vec![Event::Opened]),
            Command::Open => Err(Rejection::AlreadyOpened),
            // A refund is owed even by a closed account.
            Command::Refund { transfer_id } => match self.debits.get(transfer_id) {
                Some(amount) => Ok(vec![Event::TransferRefunded { transfer_id: transfer_id.clone(), amount: *amount }]),
                None => Err(Rejection::UnknownTransfer { transfer_id: transfer_id.clone() }),
            },
            _ if self.status != Status::Open => Err(Rejection::NotOpen { status: self.status }),
            Command::Deposit { amount } => Ok(vec![Event::Deposited { amount: positive(*amount)? }]),
            Command::Withdraw { amount } => Ok(vec![Event::Withdrawn { amount: self.covered(*amount)? }]),
            Command::Debit { transfer_id, to, amount } => Ok(vec![Event::TransferDebited {
                transfer_id: transfer_id.clone(),
                to: to.clone(),
                amount: self.covered(*amount)?,
            }]),
            Command::Credit { transfer_id, .. } if self.credited.contains(transfer_id) => Ok(Vec::new()),
            Command::Credit { transfer_id, from, amount } => Ok(vec![Event::TransferCredited {
                transfer_id: transfer_id.clone(),
                from: from.clone(),
                amount: positive(*amount)?,
            }]),
            Command::Close if self.balance != 0 => Err(Rejection::NonZeroBalance { balance: self.balance }),
            Command::Close => Ok(vec![Event::Closed]),
        }
    }

    /// `amount`, if it is positive and the balance covers it.
    fn covered(&self, amount: i64) -> Result<i64, Rejection> {
        let amount = positive(amount)?;
        if amount > self.balance {
            return Err(Rejection::InsufficientFunds { balance: self.balance, amount });
        }
        Ok(amount)
    }
}

fn positive(amount: i64) -> Result<i64, Rejection> {
    if amount <= 0 {
        return Err(Rejection::InvalidAmount { amount });
    }
    Ok(amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened_with(balance: i64) -> Account {
        let mut a = Account::new("a");
        a.apply(&Event::Opened);
        a.apply(&Event::Deposited { amount: balance });
        a
    }

    #[test]
    fn a_withdrawal_beyond_the_balance_is_refused_and_one_within_it_is_not() {
        let a = opened_with(100);
        assert_eq!(
            a.decide(&Command::Withdraw { amount: 101 }),
            Err(Rejection::InsufficientFunds { balance: 100, amount: 101 })
        );
        assert_eq!(a.decide(&Command::Withdraw { amount: 100 }), Ok(vec![Event::Withdrawn { amount: 100 }]));
        assert_eq!(a.decide(&Command::Deposit { amount: 0 }), Err(Rejection::InvalidAmount { amount: 0 }));
    }

    #[test]
    fn a_closed_account_takes_no_credit_but_still_gets_its_refund() {
        let mut a = opened_with(10);
        let debit = Command::Debit { transfer_id: "t".into(), to: "b".into(), amount: 10 };
        for e in a.decide(&debit).unwrap() {
            a.apply(&e);
        }
        a.apply(&a.decide(&Command::Close).unwrap()[0]);
        let credit = Command::Credit { transfer_id: "u".into(), from: "b".into(), amount: 1 };
        assert_eq!(a.decide(&credit), Err(Rejection::NotOpen { status: Status::Closed }));
        let refund = a.decide(&Command::Refund { transfer_id: "t".into() }).unwrap();
        assert_eq!(refund, vec![Event::TransferRefunded { transfer_id: "t".into(), amount: 10 }]);
        a.apply(&refund[0]);
        assert_eq!(a.balance, 10);
        assert_eq!(
            a.decide(&Command::Refund { transfer_id: "t".into() }).unwrap_err(),
            Rejection::UnknownTransfer { transfer_id: "t".into() }
        );
    }

    #[test]
    fn a_repeated_credit_changes_nothing() {
        let mut a = opened_with(0);
        let credit = Command::Credit { transfer_id: "t".into(), from: "b".into(), amount: 5 };
        a.apply(&a.decide(&credit).unwrap()[0]);
        assert_eq!(a.decide(&credit), Ok(Vec::new()));
        assert_eq!(a.balance, 5);
    }
}
