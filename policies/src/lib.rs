//! The network model shared by the controller and `sdnctl`: typed objects,
//! the store's state with whole-batch validation, and the administrators'
//! YAML manifests.

pub mod manifest;
pub mod model;
pub mod state;

pub use model::*;
pub use state::{BatchError, State};
