//! One module per scenario.

pub mod baseline;
pub mod chat;
pub mod connect;
pub mod group;
pub mod offline;
pub mod peer;
pub mod storm;
