//! vero-proxy: plain HTTP from local applications in, mutual TLS to Vero API out.
//!
//! The request path, in order: [`server`] accepts, [`proxy`] checks and rewrites, [`upstream`]
//! holds the identity's TLS config and connection pool, [`error`] turns failures into answers.

pub mod access;
pub mod admin;
pub mod app;
pub mod body;
pub mod business_id;
pub mod cert;
pub mod certsvc;
pub mod check;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod demo;
pub mod error;
pub mod gate;
pub mod identity;
pub mod log_time;
pub mod metrics;
pub mod orgs;
pub mod per_identity;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod staged;
pub mod upstream;
pub mod vero_ca;
