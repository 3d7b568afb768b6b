//! Records the git revision for `--version`.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=EE_AUTH_GIT_REV");
    // Container builds have no .git: the revision comes in as a build argument.
    if let Some(rev) = std::env::var("EE_AUTH_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
    {
        println!("cargo:rustc-env=EE_AUTH_GIT_REV={rev}");
        return;
    }
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=EE_AUTH_GIT_REV={rev}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
