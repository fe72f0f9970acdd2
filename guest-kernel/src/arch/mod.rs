//! Architecture-specific code. Only x86_64 exists; everything it needs is in one folder.

pub mod x86_64;
