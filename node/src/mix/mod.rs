//! Mixing: how nodes combine their models with their peers'. Strategies here
//! are sans-IO state machines; this module also owns the communication
//! topology and mixing weights they use.

pub mod topology;
