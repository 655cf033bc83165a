//! The fault injector: faults a user asks for (`--fault`, the config file,
//! the API's InjectFault) and the one shared value that keeps them and
//! answers the parts that carry them out.

pub mod injector;
pub mod spec;

pub use injector::{ActiveFault, CRASH_EXIT_CODE, Faults};
pub use spec::{Direction, FaultError, FaultKind, FaultSpec};
