// SPDX-License-Identifier: MIT OR Apache-2.0
//! Helpers shared by the integration tests. Include them with `mod support;`.

// Each test crate compiles its own copy of these helpers and uses only some of them.
#![allow(dead_code)]

pub mod broker;
pub mod fixtures;
pub mod pki;
pub mod tensors;
