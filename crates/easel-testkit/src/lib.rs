//! What easel's tests share, so each is written once: a quadratic objective with a known
//! minimum for the optimisers, a finite-difference check of a loss's gradient, and a seeded
//! random sequence.
//!
//! Only ever a dev-dependency (`publish = false`); its functions panic on failure, as tests do.

mod finite_difference;
mod quadratic;
mod rng;

pub use finite_difference::{assert_gradient_matches, central_difference, Tolerance};
pub use quadratic::Quadratic;
pub use rng::Rng;
