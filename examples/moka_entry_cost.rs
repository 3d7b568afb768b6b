//! What one moka entry costs in heap bytes, built the way the token cache builds its
//! index (same key type, initial capacity, an `Arc` as the value), next to
//! a plain `HashMap` holding the same keys and values. P5's memory budget is token bytes
//! + 1.5 KiB per account; this is the share moka alone takes (BENCHMARKS.md, P5).
//!
//! Usage: `cargo run --release --example moka_entry_cost [ENTRIES=100000]` (glibc: the
//! numbers are glibc's own count of bytes in use, chunk headers included).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ee_auth_sidecar::credentials::CredentialKey;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> usize {
    eprintln!("moka_entry_cost needs glibc (mallinfo2)");
    std::process::exit(2);
}

type Cell = Arc<Mutex<Option<u64>>>;

fn main() {
    let entries: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let set: Arc<str> = Arc::from("idp|refresh_token|");
    let keys: Vec<CredentialKey> = (0..entries)
        .map(|i| CredentialKey::new(Arc::from(format!("acct-{i}")), set.clone()))
        .collect();
    let cells: Vec<Cell> = (0..entries).map(|_| Cell::default()).collect();
    let before = heap_in_use();
    let moka_cost = {
        let cache: moka::sync::Cache<CredentialKey, Cell> = moka::sync::Cache::builder()
            .initial_capacity(entries)
            .eviction_listener(|_, _, _| {})
            .build();
        for (key, cell) in keys.iter().zip(&cells) {
            cache.insert(key.clone(), cell.clone());
        }
        // Every entry read once, and moka's pending bookkeeping applied, as in service.
        for key in &keys {
            std::hint::black_box(cache.get(key));
        }
        cache.run_pending_tasks();
        let cost = heap_in_use().saturating_sub(before);
        drop(cache);
        cost
    };

    let before = heap_in_use();
    let mut map: HashMap<CredentialKey, Cell> = HashMap::with_capacity(entries);
    for (key, cell) in keys.iter().zip(&cells) {
        map.insert(key.clone(), cell.clone());
    }
    let map_cost = heap_in_use().saturating_sub(before);
    std::hint::black_box(&map);

    println!("entries: {entries}");
    println!(
        "moka::sync::Cache:   {:.0} bytes per entry",
        moka_cost as f64 / entries as f64
    );
    println!(
        "std HashMap:         {:.0} bytes per entry",
        map_cost as f64 / entries as f64
    );
}
