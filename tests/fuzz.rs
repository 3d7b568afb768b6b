//! Stable-toolchain fuzzing of the four parsers that read outside input: the token
//! query, the Basic-auth header, the config file and the token response. The checks are
//! the cargo-fuzz targets' own (`fuzz/checks.rs`); the inputs are the seed corpus in
//! `fuzz/corpus/<target>/` and random mutations of it (bit flips, byte and dictionary
//! insertions, deletions, duplications, splices), without coverage feedback.
//!
//! By default each target replays a fixed, per-target seed for `FUZZ_RUNS` inputs (default
//! 500 000) or `FUZZ_SECS` seconds (default 8), whichever ends first: the test suite must
//! give the same verdict on every run, so a slower machine sees a prefix of the same
//! inputs, never different ones. `FUZZ_SEED=<n>` picks another seed and `FUZZ_SEED=random`
//! a fresh one per run (exploration: `FUZZ_SEED=random FUZZ_SECS=300 FUZZ_RUNS=0 cargo
//! test --test fuzz`, where `FUZZ_RUNS=0` lifts the count limit). A failing input is
//! written to `target/fuzz-failures/` and printed; once fixed, it joins the seed corpus.
//! The coverage-guided run with sanitizers is `RUSTC_BOOTSTRAP=1 cargo fuzz run <target>`
//! (fuzz/README.md).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;
use std::time::{Duration, Instant};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(out.len() >= 5, "seed corpus {} is too small", dir.display());
    out
}

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\xc3\xe2\xf0%+&=:\"{}[]\\,.-0e \r\n\t";

fn mutate(rng: &mut fastrand::Rng, seeds: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
    let mut data = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(1..=6) {
        let len = data.len();
        match rng.u8(0..9) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                data[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                data[i] = rng.u8(..);
            }
            2 => {
                let i = rng.usize(..=len);
                data.insert(i, INTERESTING[rng.usize(..INTERESTING.len())]);
            }
            3 if len > 0 => {
                let i = rng.usize(..len);
                let n = rng.usize(1..=(len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.usize(..len);
                let n = rng.usize(1..=(len - i).min(64));
                let chunk = data[i..i + n].to_vec();
                let at = rng.usize(..=data.len());
                for _ in 0..rng.usize(1..=4) {
                    data.splice(at..at, chunk.iter().copied());
                }
            }
            5 => {
                let other = &seeds[rng.usize(..seeds.len())];
                if !other.is_empty() {
                    let from = rng.usize(..other.len());
                    let to = rng.usize(from..=other.len());
                    let at = rng.usize(..=data.len());
                    data.splice(at..at, other[from..to].iter().copied());
                }
            }
            6 if !dict.is_empty() => {
                let word = dict[rng.usize(..dict.len())];
                let at = rng.usize(..=len);
                data.splice(at..at, word.iter().copied());
            }
            7 if len > 0 => data.truncate(rng.usize(..len)),
            _ => {
                let at = rng.usize(..=len);
                let n = rng.usize(1..8);
                data.splice(at..at, (0..n).map(|_| rng.u8(..)));
            }
        }
        // Keep inputs small enough that each run stays fast.
        data.truncate(64 * 1024);
    }
    data
}

fn fuzz(target: &str, check: fn(&[u8]), dict: &[&[u8]]) {
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let runs: u64 = match std::env::var("FUZZ_RUNS") {
        Ok(s) => match s.parse() {
            Ok(0) => u64::MAX,
            Ok(n) => n,
            Err(_) => panic!("FUZZ_RUNS={s:?}: not a number"),
        },
        Err(_) => 500_000,
    };
    let seed: u64 = match std::env::var("FUZZ_SEED") {
        Ok(s) if s == "random" => fastrand::u64(..),
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("FUZZ_SEED={s:?}: not a number or `random`")),
        // A fixed seed per target (FNV-1a of its name): the default run is reproducible.
        Err(_) => target.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        }),
    };
    let seeds = corpus(target);
    let mut rng = fastrand::Rng::with_seed(seed);
    let run = |data: &[u8]| {
        if std::panic::catch_unwind(|| check(data)).is_err() {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .unwrap()
                .join("fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{target}-{seed}"));
            std::fs::write(&file, data).unwrap();
            panic!(
                "{target}: check failed on {:?} (saved to {}; FUZZ_SEED={seed})",
                String::from_utf8_lossy(data),
                file.display()
            );
        }
    };
    for s in &seeds {
        run(s);
    }
    let started = Instant::now();
    let mut n = 0u64;
    while n < runs && started.elapsed() < Duration::from_secs(secs) {
        for _ in 0..64 {
            run(&mutate(&mut rng, &seeds, dict));
            n += 1;
        }
    }
    eprintln!(
        "{target}: {} seeds, {n} mutated inputs in {:.1} s, FUZZ_SEED={seed}: no failure",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn fuzz_query_parser() {
    fuzz(
        "query",
        checks::query,
        &[
            b"account=",
            b"&proto=",
            b"imap",
            b"smtp",
            b"api",
            b"%",
            b"%ff",
            b"%c3%a9",
            b"+",
            b"&",
            b"=",
        ],
    );
}

#[test]
fn fuzz_basic_auth_parser() {
    fuzz(
        "basic",
        checks::basic,
        &[
            b"Basic ",
            b"basic ",
            b"ZWU6cDp3",
            b"==",
            b"=",
            b" ",
            b"/+",
            b"-_",
        ],
    );
}

#[test]
fn fuzz_config_parser() {
    fuzz(
        "config",
        checks::config,
        &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b":",
            b",",
            b"null",
            b"true",
            b"1e999",
            b"-0",
            b"\"\\ud800\"",
            b"\"accounts\"",
            b"\"providers\"",
            b"\"auth\"",
            b"\"adminAuth\"",
            b"\"user\"",
            b"\"pass\"",
            b"\"accessToken\"",
            b"\"provider\"",
            b"\"refreshToken\"",
            b"\"grant\"",
            b"\"scopes\"",
            b"\"protocols\"",
            b"\"imap\"",
            b"\"smtp\"",
            b"\"api\"",
            b"\"type\"",
            b"\"oauth2\"",
            b"\"microsoft\"",
            b"\"google\"",
            b"\"google-service-account\"",
            b"\"tokenUrl\"",
            b"\"clientId\"",
            b"\"clientSecret\"",
            b"\"clientAuth\"",
            b"\"basic\"",
            b"\"tenant\"",
            b"\"cloud\"",
            b"\"serviceAccountKey\"",
            b"\"client_credentials\"",
            b"\"jwt_bearer\"",
            b"\"refresh_token\"",
            b"{\"env\": \"HOME\"}",
            b"{\"file\": \"x\"}",
            b"\"http://127.0.0.1/t\"",
        ],
    );
}

#[test]
fn fuzz_token_response_parser() {
    fuzz(
        "token_response",
        checks::token_response,
        &[
            b"\"access_token\"",
            b"\"expires_in\"",
            b"\"refresh_token\"",
            b"\"error\"",
            b"1e308",
            b"-1",
            b"0.000001",
            b"\"3600\"",
            b"\" 60 \"",
            b"NaN",
            b"null",
            b"{",
            b"}",
            b"\"\"",
        ],
    );
}
