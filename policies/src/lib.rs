//! The network model shared by the controller and `sdnctl`: typed objects,
//! the store's state with whole-batch validation, the limits it enforces,
//! and the administrators' YAML manifests.

pub mod convert;
pub mod index;
pub mod limits;
pub mod manifest;
pub mod model;
pub mod state;

pub use index::Index;
pub use limits::Settings;
pub use model::*;
pub use state::{Applied, BatchError, State};
