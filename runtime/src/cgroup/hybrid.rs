//! Hybrid (v1 controllers + controller-less v2) driver.
