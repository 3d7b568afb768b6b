//! The Redis store (`--state redis://…`): EmailEngine's own Redis, under a key prefix.
//!
//! Keys: `<prefix>rt:<account>` a hash (`gen`, `rec`: the record's JSON) written only by
//! a compare-and-set script on `gen`, which also adds the account to the set
//! `<prefix>accounts` (so loading never scans a keyspace shared with EmailEngine);
//! `<prefix>lock:<account>` the spend lease (`SET NX PX` with a random owner, extended and
//! deleted only by compare scripts); `<prefix>at:<name>` an access token kept for warm
//! restarts (expires with it); `<prefix>holders` a sorted set of the processes using the
//! store, scored by when their heartbeat lapses (for `state migrate`). The connection manager reconnects by itself; every command is
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
    /// This process's holder id (in `<prefix>holders`).
    holder_id: String,
    /// Set at shutdown: the heartbeat stops.
    closed: std::sync::atomic::AtomicBool,
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
redis.call('SADD', KEYS[2], ARGV[4])
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
            closed: std::sync::atomic::AtomicBool::new(false),
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
        Ok(got.filter(|b| fits(b)))
    }

    /// Every record: (account, bytes).
    pub async fn load_all(&self) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let set = format!("{}accounts", self.prefix);
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut accounts: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .run(
                    "load",
                    ::redis::cmd("SSCAN")
                        .arg(&set)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            accounts.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        accounts.sort_unstable();
        accounts.dedup();
        let mut out = Vec::with_capacity(accounts.len());
        for chunk in accounts.chunks(500) {
            let mut pipe = ::redis::pipe();
            for a in chunk {
                pipe.cmd("HGET").arg(self.key("rt", a)).arg("rec");
            }
            let recs: Vec<Option<Vec<u8>>> = self.run("load", pipe.query_async(&mut c)).await?;
            for (account, rec) in chunk.iter().zip(recs) {
                if let Some(rec) = rec.filter(|b| fits(b)) {
                    out.push((account.clone(), rec));
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
        inv.key(format!("{}accounts", self.prefix))
            .arg(expected.to_string())
            .arg(expected.saturating_add(1).to_string())
            .arg(bytes)
            .arg(account);
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
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("gen")
            .arg(generation)
            .arg("rec")
            .arg(bytes)
            .ignore()
            .cmd("SADD")
            .arg(format!("{}accounts", self.prefix))
            .arg(account)
            .ignore();
        self.run("write", pipe.query_async::<()>(&mut c)).await
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
        let got: Option<Vec<u8>> = self
            .run(
                "read access token",
                ::redis::cmd("GET").arg(&key).query_async(&mut c),
            )
            .await?;
        Ok(got.filter(|b| fits(b)))
    }

    /// Renews this process's holder heartbeat (not after [`RedisStore::release_holder`]).
    pub async fn heartbeat(&self) -> Result<(), StateError> {
        if self.is_closed() {
            return Ok(());
        }
        let now = unix_ms();
        let key = format!("{}holders", self.prefix);
        let mut c = self.conn.clone();
        let mut pipe = ::redis::pipe();
        // Lapsed heartbeats (killed processes) go, so the set stays small.
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({now}"))
            .ignore()
            .cmd("ZADD")
            .arg(&key)
            .arg(now.saturating_add(ms(HOLDER_TTL)))
            .arg(&self.holder_id)
            .ignore();
        self.run("heartbeat", pipe.query_async::<()>(&mut c)).await
    }

    /// Whether the store was released.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Removes this process's heartbeat for good (shutdown).
    pub async fn release_holder(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut c = self.conn.clone();
        let _ = self
            .run(
                "release",
                ::redis::cmd("ZREM")
                    .arg(format!("{}holders", self.prefix))
                    .arg(&self.holder_id)
                    .query_async::<()>(&mut c),
            )
            .await;
    }

    /// How many other processes hold the store (heartbeats not lapsed).
    pub async fn holders(&self) -> Result<usize, StateError> {
        let key = format!("{}holders", self.prefix);
        let mut c = self.conn.clone();
        // ZRANGEBYSCORE rather than ZRANGE … BYSCORE: Redis 6.0 has only the former.
        let live: Vec<String> = self
            .run(
                "holders",
                ::redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(unix_ms())
                    .arg("+inf")
                    .query_async(&mut c),
            )
            .await?;
        Ok(live.iter().filter(|h| **h != self.holder_id).count())
    }
}

/// Whether a value read from Redis is within the record size limit.
fn fits(b: &[u8]) -> bool {
    b.len() as u64 <= crate::files::MAX_STATE_RECORD_BYTES
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A held Redis lease: renewed by a task until dropped, then deleted if still ours.
pub(crate) struct RedisLease {
    store: Arc<RedisStore>,
    account: Arc<str>,
    owner: String,
    renew: tokio::task::JoinHandle<()>,
    /// Until when the lease is surely ours: its length after the last successful
    /// renewal; never again once Redis said it is gone.
    valid_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl RedisLease {
    pub fn new(store: Arc<RedisStore>, account: Arc<str>, owner: String, lease: Duration) -> Self {
        let taken = tokio::time::Instant::now();
        let valid_until = Arc::new(std::sync::Mutex::new(taken.checked_add(lease)));
        let renew = {
            let (store, account, owner) = (store.clone(), account.clone(), owner.clone());
            let valid_until = valid_until.clone();
            tokio::spawn(async move {
                let every = (lease / 3).max(Duration::from_millis(50));
                loop {
                    tokio::time::sleep(every).await;
                    let asked = tokio::time::Instant::now();
                    let until = |v: Option<tokio::time::Instant>| {
                        *valid_until.lock().unwrap_or_else(|p| p.into_inner()) = v;
                    };
                    match store.extend(&account, &owner, lease).await {
                        Ok(true) => until(asked.checked_add(lease)),
                        Ok(false) => {
                            until(None);
                            tracing::warn!(account = %account,
                                "the refresh lease in Redis expired while held (the store was unreachable for longer than the lease); it is taken again before anything is written");
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
            valid_until,
        }
    }

    /// Whether the lease may have lapsed: Redis said so, or it was not renewed within
    /// its length (another process may hold it now).
    pub fn is_lost(&self) -> bool {
        let until = *self.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_none_or(|u| tokio::time::Instant::now() >= u)
    }
}

impl RedisLease {
    /// Stops renewing and deletes the lease now (shutdown: no task would run later).
    pub async fn release_now(mut self) {
        self.renew.abort();
        let owner = std::mem::take(&mut self.owner);
        let _ = self.store.release(&self.account, &owner).await;
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.renew.abort();
        if self.owner.is_empty() {
            return;
        }
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
