//! The network model shared by the controller and `sdnctl`: typed objects,
//! the store's state with whole-batch validation, the limits it enforces,
//! and the administrators' YAML manifests.
//!
//! # Adding a kind of object
//!
//! A kind is declared once, as a row of [`for_each_kind!`]: its variant,
//! type, name, state map, put operation, API listing field, rank in a batch
//! and manifest `kind:`. From the row come `Kind`, `Object`, `Op`, the
//! state's access, the API conversions and listing, the manifest parser and
//! renderer, the dependency order and `sdnctl`'s kind arguments. The
//! compiler then asks for what only the kind can say:
//! - its struct in `model.rs`, and [`Resource`] (audit line, summary);
//! - its messages in `proto/`, and [`convert::ApiResource`];
//! - with a manifest `kind:`, its spec and `ManifestResource` in
//!   `manifest.rs`, its definition in `schema/sdn-v1.schema.json` and an
//!   example under `examples/` (a test fails without them);
//! - its checks and its removal in `state.rs` and `index.rs`, and the
//!   resources it changes in the controller's `shares.rs` and `slice.rs`.

pub mod convert;
pub mod index;
pub mod l7;
pub mod lb;
pub mod limits;
pub mod manifest;
pub mod model;
pub mod state;
pub mod vip;

pub use index::Index;
pub use limits::Settings;
pub use model::*;
pub use state::{Applied, BatchError, State};
