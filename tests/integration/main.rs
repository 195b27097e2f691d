//! Integration tests: one binary, one module per area (see qdrant's
//! `lib/segment/tests/integration`).

mod cli;
mod common;
mod fuzz;
mod hardening;
mod index;
mod layers;
mod milvus;
mod model_reference;
mod open_clip;
mod precision;
mod preprocess;
mod server;
mod siglip;
mod tags;
mod tokenizer;
mod train;
mod web;
