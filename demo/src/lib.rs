//! Tools for running and testing the engagement pipeline by hand or from tests:
//!
//! - [`datagen`] (`eddy-datagen`): fills PostgreSQL's `content` and `engagement_events` tables and
//!   keeps inserting, updating and deleting events at a steady rate, every choice drawn from a seed;
//! - [`mock_api`] (`eddy-mock-api`): the external system the `http` sink posts to, which
//!   deduplicates by `Idempotency-Key`, can fail every Nth request, and reports what it saw.
//!
//! Both are libraries first (`run` functions taking their options), so tests can run them in
//! process; the binaries only parse flags.

pub mod datagen;
pub mod mock_api;
