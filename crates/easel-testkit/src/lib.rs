//! What easel's tests share, so each is written once: a quadratic objective with a known
//! minimum for the optimisers, a finite-difference check of a loss's gradient, and a seeded
//! random sequence, and the device the golden tests run on.
//!
//! Only ever a dev-dependency (`publish = false`); its functions panic on failure, as tests do.

mod device;
mod finite_difference;
mod quadratic;
mod rng;

pub use device::{device_named, test_device, TEST_DEVICE_VAR};
pub use finite_difference::{assert_gradient_matches, central_difference, Tolerance};
pub use quadratic::Quadratic;
pub use rng::Rng;
