//! A transfer between two accounts as a saga: no transaction spans the two
//! partitions, so the transfer is three local steps, each a conditional
//! append on one account:
//!
//! 1. debit the source (`TransferDebited`; refused if the balance does not
//!    cover it, and then nothing happened);
//! 2. credit the target (`TransferCredited`);
//! 3. if the credit is refused (the target is closed or was never opened),
//!    compensate: refund the source (`TransferRefunded`).
//!
//! Every step is validated against the account's own state, so no balance
//! goes negative at any point. A credit is recorded under its transfer id, so
//! repeating it changes nothing, and a refund needs the debit and happens
//! once. Not shown: a process that crashes between steps leaves the
//! transfer pending (its `TransferDebited` names the target); a recovery
//! job would scan for such debits and run steps 2–3 again.

use super::account::{Command, Rejection};
use super::store::{CommandError, EventStore};

/// A fault to inject, for tests and the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// None.
    #[default]
    None,
    /// The credit is refused as if the target's rules refused it.
    RejectCredit,
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferOutcome {
    /// Debited and credited.
    Completed,
    /// Debited, the credit refused for `reason`, and refunded.
    Refunded {
        /// Why the credit was refused.
        reason: Rejection,
    },
}

/// Moves `amount` from `from` to `to` under `transfer_id` (unique per
/// transfer). An error from the debit means nothing happened; the refund
/// is retried by the store until it is appended or the store fails.
pub async fn transfer(
    store: &EventStore,
    transfer_id: &str,
    from: &str,
    to: &str,
    amount: i64,
    fault: Fault,
) -> Result<TransferOutcome, CommandError> {
    let debit = Command::Debit { transfer_id: transfer_id.into(), to: to.into(), amount };
    store.execute(from, &debit).await?;
    let credit = Command::Credit { transfer_id: transfer_id.into(), from: from.into(), amount };
    let credited = match fault {
        Fault::RejectCredit => Err(CommandError::Rejected(Rejection::Forced)),
        Fault::None => store.execute(to, &credit).await,
    };
    match credited {
        Ok(_) => Ok(TransferOutcome::Completed),
        Err(CommandError::Rejected(reason)) => {
            store.execute(from, &Command::Refund { transfer_id: transfer_id.into() }).await?;
            Ok(TransferOutcome::Refunded { reason })
        }
        // The credit's outcome is unknown: compensating could pay twice.
        Err(e) => Err(e),
    }
}
