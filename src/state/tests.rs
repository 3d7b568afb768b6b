use super::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

fn record_path(dir: &std::path::Path, account: &str) -> PathBuf {
    dir.join("refresh-tokens")
        .join(format!("{}.json", dir::file_stem(account)))
}

#[tokio::test]
async fn rotation_survives_reopen_and_config_wins_when_changed() {
    let dir = tempfile::tempdir().unwrap();
    let acct: Arc<str> = Arc::from("a");
    let cfg = Secret::new("config-rt");
    {
        let (store, warnings) = TokenStore::open(dir.path()).unwrap();
        let store = Arc::new(store);
        assert!(warnings.is_empty());
        let (t, origin) = store.current(&acct, Some(&cfg)).unwrap();
        assert_eq!(t.expose(), "config-rt");
        store
            .rotate(&acct, origin, Secret::new("rt-2"))
            .await
            .unwrap();
        assert_eq!(store.current(&acct, Some(&cfg)).unwrap().0.expose(), "rt-2");
        store.close().await;
    }
    let (store, _) = TokenStore::open(dir.path()).unwrap();
    assert_eq!(store.current(&acct, Some(&cfg)).unwrap().0.expose(), "rt-2");
    // Operator re-consented: the config's new token wins over the persisted one.
    let (t, _) = store
        .current(&acct, Some(&Secret::new("reconsented")))
        .unwrap();
    assert_eq!(t.expose(), "reconsented");

    let meta = fs::metadata(record_path(dir.path(), "a")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let meta = fs::metadata(dir.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
}

#[tokio::test]
async fn without_a_config_token_a_record_of_origin_zero_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = TokenStore::open(dir.path()).unwrap();
    let store = Arc::new(store);
    let acct: Arc<str> = Arc::from("c");
    assert!(store.current(&acct, None).is_none());
    assert!(!store.has_token("c"));
    store
        .rotate(&acct, [0; 32], Secret::new("consented"))
        .await
        .unwrap();
    assert!(store.has_token("c"));
    assert_eq!(
        store.current(&acct, None).unwrap(),
        (Secret::new("consented"), [0; 32])
    );
    // A config token (the operator re-consented in the config) still wins.
    let cfg = Secret::new("from-config");
    assert_eq!(store.current(&acct, Some(&cfg)).unwrap().0, cfg);
}

#[tokio::test]
async fn an_older_rotation_written_late_never_replaces_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = TokenStore::open(dir.path()).unwrap();
    let store = Arc::new(store);
    let job = |version, token: &str| WriteJob {
        account: Arc::from("a"),
        origin: [7; 32],
        token: Secret::new(token),
        version,
    };
    let remember = |version, token: &str| {
        let mut records = lock(&store.records);
        let written = records.get("a").map_or(0, |r| r.written);
        records.insert(
            Arc::from("a"),
            Record {
                origin: [7; 32],
                token: Secret::new(token),
                version,
                written,
            },
        );
    };
    let on_disk = || {
        let bytes = fs::read(record_path(dir.path(), "a")).unwrap();
        record::decode(&bytes, None, Some("a")).unwrap().1
    };
    // A retry of rotation 1 that reaches the store after rotation 2 was written.
    remember(1, "rt-1");
    remember(2, "rt-2");
    store.write_in_order(&job(2, "rt-2")).await.unwrap();
    store.write_in_order(&job(1, "rt-1")).await.unwrap();
    assert_eq!(on_disk().token.expose(), "rt-2");
    remember(3, "rt-3");
    store.write_in_order(&job(3, "rt-3")).await.unwrap();
    let s = on_disk();
    assert_eq!((s.token.expose(), s.generation), ("rt-3", 2));
}

#[tokio::test]
async fn two_processes_share_a_directory_one_spender_per_account() {
    let dir = tempfile::tempdir().unwrap();
    let (one, _) = TokenStore::open(dir.path()).unwrap();
    let (two, _) = TokenStore::open(dir.path()).unwrap();
    // A third process (a `consent` run) opened before any rotation.
    let (three, _) = TokenStore::open(dir.path()).unwrap();
    let (one, two, three) = (Arc::new(one), Arc::new(two), Arc::new(three));
    let a: Arc<str> = Arc::from("a");
    let cfg = Secret::new("rt-0");
    let guard = one.lock_account(&a).await.unwrap();
    // The other store waits for the lease and gives up when it is not released.
    let e = two
        .acquire(&a, Duration::from_millis(100))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, StateError::LockTimeout { .. }), "{e}");
    // Another account is not held.
    assert!(two.acquire(&Arc::from("b"), Duration::ZERO).await.is_ok());
    let (_, origin) = one.current(&a, Some(&cfg)).unwrap();
    one.rotate(&a, origin, Secret::new("rt-1")).await.unwrap();
    drop(guard);
    let guard = two.lock_account(&a).await.unwrap();
    // After taking the lease the other process re-reads and spends the newest token.
    assert!(two.reload_record(&a).await.unwrap());
    assert_eq!(two.current(&a, Some(&cfg)).unwrap().0.expose(), "rt-1");
    two.rotate(&a, origin, Secret::new("rt-2")).await.unwrap();
    drop(guard);
    // Under the lease, a write that follows a stale generation (this process did not
    // re-read: its lease had lapsed) is refused, and the stored record is used.
    let guard = one.lock_account(&a).await.unwrap();
    let e = one
        .rotate(&a, origin, Secret::new("stale"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StateError::Conflict {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(one.current(&a, Some(&cfg)).unwrap().0.expose(), "rt-2");
    assert_eq!(one.unpersisted_count(), 0);
    drop(guard);
    // Outside a refresh (a consent stored by another process), a write replaces whatever
    // is stored, under a lease taken for it.
    three
        .rotate(&a, [0; 32], Secret::new("consented"))
        .await
        .unwrap();
    assert!(one.reload_record(&a).await.unwrap());
    assert_eq!(one.current(&a, None).unwrap().0.expose(), "consented");
}

#[tokio::test]
async fn a_sealed_record_copied_or_tampered_is_refused_and_the_account_reported() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(Keyring::from_keys(&[[3; 32]]));
    let mut opts = StoreOptions::new(Location::Dir(dir.path().to_owned()));
    opts.keys = Some(keys.clone());
    let (store, _) = TokenStore::connect(&opts).await.unwrap();
    let store = Arc::new(store);
    for a in ["a", "b"] {
        store
            .rotate(&Arc::from(a), [1; 32], Secret::new(format!("rt-{a}")))
            .await
            .unwrap();
    }
    let text = fs::read_to_string(record_path(dir.path(), "a")).unwrap();
    assert!(!text.contains("rt-a"), "sealed: {text}");
    // a's record copied over b's.
    fs::copy(record_path(dir.path(), "a"), record_path(dir.path(), "b")).unwrap();
    let b: Arc<str> = Arc::from("b");
    let e = store.reload_record(&b).await.unwrap_err().to_string();
    assert!(
        e.contains("account b") && e.contains("another account"),
        "{e}"
    );
    assert!(store.current(&b, Some(&Secret::new("x"))).is_none());
    assert_eq!(store.persist_status("b").unwrap().state, "refused");
    // a's record tampered with.
    let tampered = text.replacen("\"sealed\":\"", "\"sealed\":\"AAAA", 1);
    fs::write(record_path(dir.path(), "a"), tampered).unwrap();
    let (again, warnings) = TokenStore::connect(&opts).await.unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("account a") && w.contains("tampered")),
        "{warnings:?}"
    );
    assert!(again.refused("a").is_some());
    assert!(again
        .current(&Arc::from("a"), Some(&Secret::new("x")))
        .is_none());
}

#[tokio::test]
async fn records_under_an_older_key_are_resealed_with_the_newest_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions::new(Location::Dir(dir.path().to_owned()));
    opts.keys = Some(Arc::new(Keyring::from_keys(&[[1; 32]])));
    let a: Arc<str> = Arc::from("a");
    {
        let (store, _) = TokenStore::connect(&opts).await.unwrap();
        let store = Arc::new(store);
        store
            .rotate(&a, [1; 32], Secret::new("rt-1"))
            .await
            .unwrap();
        store.close().await;
    }
    let rotated = Arc::new(Keyring::from_keys(&[[2; 32], [1; 32]]));
    opts.keys = Some(rotated.clone());
    let (store, warnings) = TokenStore::connect(&opts).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let store = Arc::new(store);
    assert_eq!(store.current(&a, None), None, "origin differs");
    let origin = [1; 32];
    assert_eq!(
        lock(&store.records).get("a").unwrap().token.expose(),
        "rt-1"
    );
    store.rotate(&a, origin, Secret::new("rt-2")).await.unwrap();
    let text = fs::read_to_string(record_path(dir.path(), "a")).unwrap();
    assert!(text.contains(rotated.newest()), "{text}");
    // The old key alone no longer opens it.
    opts.keys = Some(Arc::new(Keyring::from_keys(&[[1; 32]])));
    let (_, warnings) = TokenStore::connect(&opts).await.unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not in --state-key-file")),
        "{warnings:?}"
    );
}

#[test]
fn torn_or_foreign_files_are_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("refresh-tokens");
    fs::create_dir_all(&tokens).unwrap();
    fs::write(tokens.join("x.json"), b"{\"version\":1,").unwrap();
    fs::write(tokens.join("y.json.tmp"), b"partial").unwrap();
    let (store, warnings) = TokenStore::open(dir.path()).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(store.is_empty());
    assert!(!tokens.join("y.json.tmp").exists());
}

#[test]
fn an_unusable_record_says_what_is_wrong_with_it() {
    let good = "ab".repeat(32);
    let record = |version: u32, origin: &str, token: &str| {
        format!(
            r#"{{"version":{version},"account":"a","configTokenSha256":"{origin}","refreshToken":"{token}","updatedAtUnix":1}}"#
        )
    };
    let cases = [
        ("[1]".to_owned(), "not a refresh-token record"),
        (record(3, &good, "r"), "unknown record version 3"),
        (
            record(2, &good, "r"),
            "the record is sealed and no --state-key-file was given",
        ),
        (record(1, "abc", "r"), "bad configTokenSha256"),
        (record(1, &"zz".repeat(32), "r"), "bad configTokenSha256"),
        (record(1, &good, ""), "empty refreshToken"),
    ];
    for (text, why) in &cases {
        let (_, e) = record::decode(text.as_bytes(), None, None).expect_err(why);
        assert_eq!(e.to_string(), *why, "{text}");
    }
    let (account, rec) = record::decode(record(1, &good, "r").as_bytes(), None, None).unwrap();
    assert_eq!((account.as_str(), rec.token.expose()), ("a", "r"));
}

#[tokio::test]
async fn a_store_rolled_back_to_an_older_record_is_not_spent() {
    let dir = tempfile::tempdir().unwrap();
    let acct: Arc<str> = Arc::from("a");
    let (store, _) = TokenStore::open(dir.path()).unwrap();
    let store = Arc::new(store);
    store
        .rotate(&acct, [0; 32], Secret::new("rt-1"))
        .await
        .unwrap();
    let old = fs::read(record_path(dir.path(), "a")).unwrap();
    store
        .rotate(&acct, [0; 32], Secret::new("rt-2"))
        .await
        .unwrap();
    // Restored from an older backup or snapshot: generation 1 again.
    fs::write(record_path(dir.path(), "a"), &old).unwrap();
    let _g = store.lock_account(&acct).await.unwrap();
    let changed = store.reload_record(&acct).await.unwrap();
    assert!(!changed, "an older record is not taken");
    assert_eq!(
        store.current(&acct, None).unwrap().0.expose(),
        "rt-2",
        "the newer token is spent, not the superseded one"
    );
}

#[tokio::test]
async fn a_rotation_after_the_store_lost_the_record_is_written_back() {
    let dir = tempfile::tempdir().unwrap();
    let acct: Arc<str> = Arc::from("a");
    let (store, _) = TokenStore::open(dir.path()).unwrap();
    let store = Arc::new(store);
    store
        .rotate(&acct, [0; 32], Secret::new("rt-1"))
        .await
        .unwrap();
    store
        .rotate(&acct, [0; 32], Secret::new("rt-2"))
        .await
        .unwrap();
    // Lost (Redis restarted empty, FLUSHDB, a wiped directory).
    fs::remove_file(record_path(dir.path(), "a")).unwrap();
    let g = store.lock_account(&acct).await.unwrap();
    store.reload_record(&acct).await.unwrap();
    assert_eq!(store.current(&acct, None).unwrap().0.expose(), "rt-2");
    // rt-2 is spent; the provider answers rt-3, which must not be thrown away.
    store
        .rotate(&acct, [0; 32], Secret::new("rt-3"))
        .await
        .expect("written back");
    drop(g);
    assert_eq!(store.current(&acct, None).unwrap().0.expose(), "rt-3");
    let (reopened, _) = TokenStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened.current(&acct, None).unwrap().0.expose(),
        "rt-3",
        "and it is on disk"
    );
}

#[tokio::test]
async fn migrate_seals_a_store_that_holds_plain_and_sealed_records_and_lists_the_plain_ones() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let keys = Arc::new(Keyring::from_keys(&[[3; 32]]));
    let write = |keys: Option<Arc<Keyring>>, account: &'static str, token: &'static str| {
        let mut opts = StoreOptions::new(Location::Dir(src.path().to_owned()));
        opts.keys = keys;
        async move {
            let (store, _) = TokenStore::connect(&opts).await.unwrap();
            let store = Arc::new(store);
            let acct: Arc<str> = Arc::from(account);
            store
                .rotate(&acct, [0; 32], Secret::new(token))
                .await
                .unwrap();
            store.close().await;
        }
    };
    // Written before the key was set, and after.
    write(None, "old", "rt-plain").await;
    write(Some(keys.clone()), "new", "rt-sealed").await;
    let mut from = StoreOptions::new(Location::Dir(src.path().to_owned()));
    from.keys = Some(keys.clone());
    let mut to = StoreOptions::new(Location::Dir(dst.path().to_owned()));
    to.keys = Some(keys.clone());
    let done = migrate(&from, &to).await.unwrap();
    assert_eq!(done.copied, 2, "{done:?}");
    assert!(done.skipped.is_empty(), "{done:?}");
    assert_eq!(done.plain, ["old"]);
    // The copy is sealed throughout, and a sidecar with the key reads both.
    for account in ["old", "new"] {
        let text = fs::read_to_string(record_path(dst.path(), account)).unwrap();
        assert!(!text.contains("rt-"), "{text}");
    }
    let (store, warnings) = TokenStore::connect(&to).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    for (account, token) in [("old", "rt-plain"), ("new", "rt-sealed")] {
        let acct: Arc<str> = Arc::from(account);
        assert_eq!(store.current(&acct, None).unwrap().0.expose(), token);
    }
}

#[tokio::test]
async fn a_write_without_the_key_never_replaces_a_sealed_record() {
    let dir = tempfile::tempdir().unwrap();
    let a: Arc<str> = Arc::from("a");
    let mut sealed = StoreOptions::new(Location::Dir(dir.path().to_owned()));
    sealed.keys = Some(Arc::new(Keyring::from_keys(&[[4; 32]])));
    let (store, _) = TokenStore::connect(&sealed).await.unwrap();
    let store = Arc::new(store);
    store
        .rotate(&a, [0; 32], Secret::new("rt-sealed"))
        .await
        .unwrap();
    store.close().await;
    // A consent stored by a process started without the key (another pod, `consent`).
    let plain = StoreOptions::new(Location::Dir(dir.path().to_owned()));
    let (keyless, _) = TokenStore::connect(&plain).await.unwrap();
    let keyless = Arc::new(keyless);
    let e = keyless
        .rotate(&a, [0; 32], Secret::new("rt-plain"))
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::SealedWithoutKey { .. }), "{e}");
    keyless.close().await;
    let (store, warnings) = TokenStore::connect(&sealed).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(store.current(&a, None).unwrap().0.expose(), "rt-sealed");
}
