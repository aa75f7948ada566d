//! Ferry's cluster store: which nodes exist and are alive, which VMs exist and which node owns
//! each of them, and what migrations happened. One [`store::Store`] trait, two backends:
//! [`sqlite`] (embedded, the default: one database file shared by the agents of a machine) and
//! [`etcd`] (for clusters across machines: leases for node liveness, transactions for
//! ownership).

pub mod etcd;
pub mod model;
pub mod sqlite;
pub mod store;
pub mod testing;

pub use contract::{MigrationParams, Phase, Summary};
pub use model::*;
pub use store::{open, open_with, prune_migrations, Store, StoreError};
