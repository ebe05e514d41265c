//! The bank's events: what happened to one account. Each is a record whose
//! key is the account id and whose value is the event as JSON (`{"type":
//! "deposited", "amount": 50}`). Events are facts: they are never refused
//! when replayed (the refusing happens before they are appended).

use serde::{Deserialize, Serialize};

/// Something that happened to an account. Amounts are in cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The account was opened with a zero balance.
    Opened,
    /// Money came in.
    Deposited {
        /// Cents.
        amount: i64,
    },
    /// Money went out.
    Withdrawn {
        /// Cents.
        amount: i64,
    },
    /// First step of a transfer: the money left this account for `to`.
    TransferDebited {
        /// The transfer's id, unique per transfer.
        transfer_id: String,
        /// The account to credit.
        to: String,
        /// Cents.
        amount: i64,
    },
    /// Second step of a transfer: the money arrived from `from`.
    TransferCredited {
        /// The transfer's id.
        transfer_id: String,
        /// The debited account.
        from: String,
        /// Cents.
        amount: i64,
    },
    /// Compensation of a transfer whose credit failed: the money is back.
    TransferRefunded {
        /// The transfer's id.
        transfer_id: String,
        /// Cents.
        amount: i64,
    },
    /// The account was closed (its balance was zero).
    Closed,
}

impl Event {
    /// The record value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serializes")
    }

    /// Parses a record value.
    pub fn decode(value: &[u8]) -> serde_json::Result<Event> {
        serde_json::from_slice(value)
    }
}

/// An event as read back from its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The account (the record's key).
    pub account: String,
    /// Where it is in the partition.
    pub offset: i64,
    /// What happened.
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_round_trips_through_its_json() {
        let e = Event::TransferDebited { transfer_id: "t1".into(), to: "bob".into(), amount: 5 };
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        assert_eq!(String::from_utf8(Event::Opened.encode()).unwrap(), r#"{"type":"opened"}"#);
    }
}
