//! ee-auth-sidecar: an authentication server for EmailEngine.
//!
//! EmailEngine calls `GET <authServer>?account=<id>&proto=imap|smtp|api` on every IMAP/SMTP
//! connection and every Gmail/Graph API request. This crate answers from memory with a
//! token that is never expired, refreshed ahead of expiry in the background.
//!
//! See ARCHITECTURE.md for the module map, one request's path and who owns what.
//!
//! Data flows request → [`server`] → [`protocol`] → [`cache`] → [`upstream`] →
//! [`provider`]; the account map flows in through [`config`], is turned into routes in
//! [`shared`] and replaced by [`reload`]; [`sidecar`] builds and stops it all. Rotated
//! refresh tokens are kept durable by [`state`].

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cli;
pub mod config;
pub mod connections;
pub mod consent;
pub mod credentials;
pub mod error;
pub mod files;
pub mod limits;
pub mod metrics;
pub mod options;
pub mod pickup;
pub mod priority;
pub mod protocol;
pub mod provider;
pub mod reload;
pub mod secret;
pub mod server;
pub mod shared;
pub mod sidecar;
pub mod state;
pub mod status;
pub mod ui;
pub mod upstream;

pub use options::Options;
pub use sidecar::{start, Running, StartError};
