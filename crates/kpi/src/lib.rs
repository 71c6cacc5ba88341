//! Library side of the `kpi` binary: the demo history generator and the event publisher, also
//! used by the benchmark.

pub mod demo;
pub mod publish;
