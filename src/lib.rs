//! ee-auth-sidecar: an authentication server for EmailEngine.
//!
//! EmailEngine calls `GET <authServer>?account=<id>&proto=imap|smtp|api` on every IMAP/SMTP
//! connection and every Gmail/Graph API request. This crate answers from memory with a
//! token that is never expired, refreshed ahead of expiry in the background.
//!
//! Data flows request → [`protocol`] → [`cache`] → [`upstream`] → [`provider`]; the
//! account map flows in through [`config`] and one `ArcSwap` in [`sidecar`], replaced by
//! [`reload`]. Rotated refresh tokens are kept durable by [`state`].

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cli;
pub mod config;
pub mod connections;
pub mod credentials;
pub mod error;
pub mod files;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod provider;
pub mod reload;
pub mod secret;
pub mod server;
pub mod sidecar;
pub mod state;
pub mod upstream;

pub use sidecar::{start, Options, Running, StartError};
