//! The Redis store (`--state redis://…`): EmailEngine's own Redis, under a key prefix.
//!
//! Keys: `<prefix>rt:<account>` a hash (`gen`, `rec`: the record's JSON) written only by
//! a compare-and-set script on `gen`; `<prefix>lock:<account>` the spend lease (`SET NX
//! PX` with a random owner, extended and deleted only by compare scripts);
//! `<prefix>at:<name>` an access token kept for warm restarts (expires with it);
//! `<prefix>holder:<id>` a heartbeat of each process using the store (for
//! `state migrate`). The connection manager reconnects by itself; every command is
//! bounded by a timeout, and the store's health (reachable or since when not) is kept
//! for status and metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};

use super::StateError;

/// Shortest and longest prefix check: printable, no spaces or glob characters.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StateError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadPrefix(prefix.to_owned()))
    }
}

/// The host and port of a Redis URL, for logs (never its credentials).
pub(crate) fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or("").to_owned()
}

/// Whether the store answers, and since when it has not.
#[derive(Clone, Debug, Default)]
pub(crate) struct Health {
    pub down_since: Option<SystemTime>,
    pub error: Option<String>,
}

pub(crate) struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    pub host: String,
    timeout: Duration,
    health: Mutex<Health>,
    /// This process's holder id (heartbeat key).
    holder_id: String,
    scripts: Scripts,
}

struct Scripts {
    cas: Script,
    extend: Script,
    release: Script,
}

const CAS: &str = r"
local g = redis.call('HGET', KEYS[1], 'gen')
if (g or '0') ~= ARGV[1] then return g or '0' end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'rec', ARGV[3])
return 'ok'";

const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// How long a holder heartbeat lives without renewal.
pub(crate) const HOLDER_TTL: Duration = Duration::from_secs(15);

/// A random 128-bit id, hex.
pub(crate) fn random_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// A store on `url` (connected lazily: an unreachable Redis at start is reported by
    /// the first command, and the manager keeps reconnecting).
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, StateError> {
        check_prefix(prefix)?;
        let host = url_host(url);
        if url.starts_with("rediss://") {
            // redis-rs builds its rustls config from the process default provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let bad = |e: ::redis::RedisError| StateError::BadUrl {
            host: host.clone(),
            why: e.to_string(),
        };
        let client = Client::open(url).map_err(bad)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(bad)?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
            host,
            timeout,
            health: Mutex::new(Health::default()),
            holder_id: random_id(),
            scripts: Scripts {
                cas: Script::new(CAS),
                extend: Script::new(EXTEND),
                release: Script::new(RELEASE),
            },
        })
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs one command with the timeout, keeping the health current.
    async fn run<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StateError> {
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(v) => {
                if let Some(since) = h.down_since.take() {
                    let down = SystemTime::now().duration_since(since).unwrap_or_default();
                    tracing::info!(host = %self.host, unreachable_ms = down.as_millis() as u64,
                        "Redis state store reachable again");
                }
                h.error = None;
                Ok(v)
            }
            Err(why) => {
                if h.down_since.is_none() {
                    h.down_since = Some(SystemTime::now());
                    tracing::warn!(host = %self.host, op, error = %why,
                        "Redis state store unreachable: cached tokens are still served; refreshes that may rotate a refresh token wait for it");
                }
                h.error = Some(why.clone());
                Err(StateError::Redis {
                    host: self.host.clone(),
                    op,
                    why,
                })
            }
        }
    }

    /// One account's record bytes and generation.
    pub async fn read(&self, account: &str) -> Result<Option<Vec<u8>>, StateError> {
        let key = self.key("rt", account);
        let mut c = self.conn.clone();
        let got: Option<Vec<u8>> = self
            .run(
                "read",
                ::redis::cmd("HGET")
                    .arg(&key)
                    .arg("rec")
                    .query_async(&mut c),
            )
            .await?;
        Ok(got.filter(|b| b.len() as u64 <= crate::files::MAX_STATE_RECORD_BYTES))
    }

    /// Every record: (account, bytes).
    pub async fn load_all(&self) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let pattern = format!("{}rt:*", self.prefix);
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .run(
                    "scan",
                    ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let strip = format!("{}rt:", self.prefix);
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut pipe = ::redis::pipe();
            for k in chunk {
                pipe.cmd("HGET").arg(k).arg("rec");
            }
            let recs: Vec<Option<Vec<u8>>> = self.run("load", pipe.query_async(&mut c)).await?;
            for (k, rec) in chunk.iter().zip(recs) {
                if let (Some(account), Some(rec)) = (k.strip_prefix(&strip), rec) {
                    out.push((account.to_owned(), rec));
                }
            }
        }
        Ok(out)
    }

    /// Replaces the record if its generation is `expected`; `Err(found)` otherwise.
    pub async fn write_if(
        &self,
        account: &str,
        bytes: &[u8],
        expected: u64,
    ) -> Result<Result<(), u64>, StateError> {
        let key = self.key("rt", account);
        let mut c = self.conn.clone();
        let mut inv = self.scripts.cas.key(&key);
        inv.arg(expected.to_string())
            .arg(expected.saturating_add(1).to_string())
            .arg(bytes);
        let got: String = self.run("write", inv.invoke_async(&mut c)).await?;
        if got == "ok" {
            Ok(Ok(()))
        } else {
            Ok(Err(got.parse().unwrap_or(u64::MAX)))
        }
    }

    /// Writes a record whatever is there (`state migrate` into an unused store).
    pub async fn put(
        &self,
        account: &str,
        bytes: &[u8],
        generation: u64,
    ) -> Result<(), StateError> {
        let key = self.key("rt", account);
        let mut c = self.conn.clone();
        self.run(
            "write",
            ::redis::cmd("HSET")
                .arg(&key)
                .arg("gen")
                .arg(generation)
                .arg("rec")
                .arg(bytes)
                .query_async::<()>(&mut c),
        )
        .await
    }

    /// Tries once to take `account`'s lease for `lease`; the owner id when taken.
    pub async fn try_lock(
        &self,
        account: &str,
        lease: Duration,
    ) -> Result<Option<String>, StateError> {
        let key = self.key("lock", account);
        let owner = random_id();
        let mut c = self.conn.clone();
        let got: Option<String> = self
            .run(
                "lock",
                ::redis::cmd("SET")
                    .arg(&key)
                    .arg(&owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms(lease))
                    .query_async(&mut c),
            )
            .await?;
        Ok(got.map(|_| owner))
    }

    /// Extends a lease we own; false when it is no longer ours (expired, taken).
    pub async fn extend(
        &self,
        account: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StateError> {
        let key = self.key("lock", account);
        let mut c = self.conn.clone();
        let mut inv = self.scripts.extend.key(&key);
        inv.arg(owner).arg(ms(lease));
        let n: i64 = self.run("extend lock", inv.invoke_async(&mut c)).await?;
        Ok(n == 1)
    }

    /// Deletes a lease if we still own it.
    pub async fn release(&self, account: &str, owner: &str) -> Result<(), StateError> {
        let key = self.key("lock", account);
        let mut c = self.conn.clone();
        let mut inv = self.scripts.release.key(&key);
        inv.arg(owner);
        let _: i64 = self.run("release lock", inv.invoke_async(&mut c)).await?;
        Ok(())
    }

    /// Keeps an access token until it expires.
    pub async fn put_access(
        &self,
        name: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<(), StateError> {
        let key = self.key("at", name);
        let mut c = self.conn.clone();
        self.run(
            "write access token",
            ::redis::cmd("SET")
                .arg(&key)
                .arg(bytes)
                .arg("PX")
                .arg(ms(ttl))
                .query_async::<()>(&mut c),
        )
        .await
    }

    /// A kept access token.
    pub async fn get_access(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let key = self.key("at", name);
        let mut c = self.conn.clone();
        self.run(
            "read access token",
            ::redis::cmd("GET").arg(&key).query_async(&mut c),
        )
        .await
    }

    /// Renews this process's holder heartbeat.
    pub async fn heartbeat(&self) -> Result<(), StateError> {
        let key = self.key("holder", &self.holder_id);
        let mut c = self.conn.clone();
        self.run(
            "heartbeat",
            ::redis::cmd("SET")
                .arg(&key)
                .arg(std::process::id())
                .arg("PX")
                .arg(ms(HOLDER_TTL))
                .query_async::<()>(&mut c),
        )
        .await
    }

    /// Removes this process's heartbeat (shutdown).
    pub async fn release_holder(&self) {
        let key = self.key("holder", &self.holder_id);
        let mut c = self.conn.clone();
        let _ = self
            .run(
                "release",
                ::redis::cmd("DEL").arg(&key).query_async::<()>(&mut c),
            )
            .await;
    }

    /// How many processes hold the store (live heartbeats).
    pub async fn holders(&self) -> Result<usize, StateError> {
        let pattern = format!("{}holder:*", self.prefix);
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut n = 0usize;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .run(
                    "scan",
                    ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            n += batch
                .iter()
                .filter(|k| !k.ends_with(&self.holder_id))
                .count();
            cursor = next;
            if cursor == 0 {
                return Ok(n);
            }
        }
    }
}

/// A held Redis lease: renewed by a task until dropped, then deleted if still ours.
pub(crate) struct RedisLease {
    store: Arc<RedisStore>,
    account: Arc<str>,
    owner: String,
    renew: tokio::task::JoinHandle<()>,
}

impl RedisLease {
    pub fn new(store: Arc<RedisStore>, account: Arc<str>, owner: String, lease: Duration) -> Self {
        let renew = {
            let (store, account, owner) = (store.clone(), account.clone(), owner.clone());
            tokio::spawn(async move {
                let every = (lease / 3).max(Duration::from_millis(50));
                loop {
                    tokio::time::sleep(every).await;
                    match store.extend(&account, &owner, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(account = %account,
                                "the refresh lease in Redis expired while held (the store was unreachable for longer than the lease)");
                            return;
                        }
                        // Unreachable: keep trying; the health shows it.
                        Err(_) => {}
                    }
                }
            })
        };
        RedisLease {
            store,
            account,
            owner,
            renew,
        }
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.renew.abort();
        let (store, account, owner) = (
            self.store.clone(),
            self.account.clone(),
            std::mem::take(&mut self.owner),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.release(&account, &owner).await;
            });
        }
    }
}
