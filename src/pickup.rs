//! Picking up a refresh token that another process stored: an account waiting for
//! consent (no refresh token anywhere) or refused with `invalid_grant` gets a token when
//! someone runs `ee-auth-sidecar consent`, and a running sidecar must use it without a
//! restart or a config change.
//!
//! [`Upstream`](crate::upstream::Upstream) registers such accounts in [`Awaiting`](crate::upstream::Awaiting) as it
//! sees them fail (and forgets them when a fetch succeeds); [`poll`] re-reads only their
//! records, a bounded batch per round on the blocking pool, and refreshes an account at
//! once when its record changed. Nothing here touches the serving path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::AccountKind;
use crate::shared::Sidecar;

/// Records re-read per round at most: a map of thousands of accounts waiting for consent
/// is covered over several rounds instead of a burst of file reads.
pub const MAX_PER_ROUND: usize = 256;

/// Every `interval`, re-reads the records of a batch of waiting accounts; each whose
/// record changed is refreshed at once (in a task of its own). Ends at shutdown.
pub async fn poll(sidecar: Arc<Sidecar>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cursor: Option<Arc<str>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let awaiting = sidecar.cache().upstream().awaiting();
        let batch = awaiting.batch(cursor.as_ref(), MAX_PER_ROUND);
        cursor = batch.last().cloned();
        if batch.is_empty() {
            continue;
        }
        let store = sidecar.token_store().clone();
        let upstream = sidecar.cache().upstream().clone();
        let mut read = Vec::with_capacity(batch.len());
        for account in batch {
            // Under the account's lock: a rotation or a consent being written in this
            // process is never overtaken by the older record the store still holds.
            let changed = {
                let _held = upstream.hold_account(&account).await;
                store.reload_record(&account).await
            };
            read.push((account, changed));
        }
        for (account, changed) in read {
            match changed {
                Ok(true) if spends_the_stored_token(&sidecar, &account) => {
                    refresh(&sidecar, &account)
                }
                Ok(true) => {}
                Ok(false) => {
                    // Gone from the config: nobody waits for it any more.
                    if sidecar.routes().route(&account).is_none() {
                        awaiting.remove(&account);
                    }
                }
                Err(e) => {
                    tracing::warn!(account = %account, error = %e, "cannot read the account's refresh-token record; tried again later");
                }
            }
        }
    }
}

/// Whether the account's refresh would spend the record just read: not when the config
/// has a token of another origin (a record of an earlier config token, which loses to
/// the config and is dropped here). Without this, such a record read again every round
/// would refresh the account every round with a config token the provider refuses.
fn spends_the_stored_token(sidecar: &Sidecar, account: &Arc<str>) -> bool {
    let config = sidecar.config();
    let Some(AccountKind::OAuth(o)) = config.account(account).map(|a| &a.kind) else {
        return false;
    };
    let Some(set) = o
        .sets()
        .into_iter()
        .find(|s| s.grant == crate::credentials::Grant::RefreshToken)
    else {
        return false;
    };
    let store = sidecar.token_store();
    // `current` drops a record the config's token supersedes.
    let _ = store.current(account, set.refresh_token.as_ref());
    store.has_token(account)
}

/// Refreshes every credential set of `account` now, in the background.
pub fn refresh(sidecar: &Arc<Sidecar>, account: &Arc<str>) {
    let entries: Vec<_> = {
        let routes = sidecar.routes();
        let (Some(route), Some(config_account)) =
            (routes.route(account), routes.config().account(account))
        else {
            return;
        };
        let AccountKind::OAuth(o) = &config_account.kind else {
            return;
        };
        o.sets()
            .into_iter()
            .filter_map(|set| route.entry_of(&set.key).cloned())
            .collect()
    };
    tracing::info!(account = %account, "a new refresh token is in the state store (consent); refreshing the account with it");
    for entry in entries {
        let cache = sidecar.cache().clone();
        tokio::spawn(async move {
            // The outcome is the entry's status and log line, as for any refresh.
            let _ = cache.force_refresh(&entry).await;
        });
    }
}
