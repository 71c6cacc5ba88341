//! Integration tests: the real `kpi` binary against a real `nats-server` (one per test), a
//! real sled store on disk and a real HTTP listener. One test binary; helpers in `kpi_tests`.
#![allow(clippy::unwrap_used)]

mod api;
mod cluster;
mod connector_state;
mod connectors;
mod crash;
mod dead_letters;
mod deploy;
mod fuzz;
mod history;
mod http_limits;
mod operations;
mod page;
