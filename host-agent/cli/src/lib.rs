//! What the `pagecast` command line needs beyond the other crates: the
//! topology file `pagecast plan` reads, the sharing figures `pagecast scan`
//! reports, and raw images as cast page sources and sinks. The subcommands
//! themselves live in the binary (`src/commands/`).

pub mod castio;
pub mod forward;
pub mod interrupts;
pub mod scan;
pub mod topology;
