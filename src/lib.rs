// SPDX-License-Identifier: MIT OR Apache-2.0
//! patchflow: visual anomaly detection on live video.
//!
//! The PatchFlow model (a normalizing flow over multi-scale patch features of a
//! pretrained CNN) on candle, with the image operations, training, model files and MQTT
//! publishing that the `patchflowscore` GStreamer element and the `patchflow` CLI use.

pub mod alarm;
pub mod bench;
pub mod checkpoint;
pub mod convert;
pub mod device;
pub mod eval;
pub mod health;
pub mod imageops;
pub mod import;
pub mod line;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod pickle;
pub mod predict;
pub mod pth;
pub mod scoring;
pub mod train;
