//! One module per scenario.

pub mod baseline;
pub mod chat;
pub mod connect;
pub mod group;
pub mod peer;
