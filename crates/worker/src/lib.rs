//! The `ferry-vmm` worker: one process per VM. This library part holds the control API
//! (JSON lines over a unix socket) shared by the worker, its `ctl` client and other Ferry
//! components.

pub mod api;
pub mod qmp;
pub mod security;
pub mod server;
