//! `IBEX_PRICES_FILE` (SPEC §10): `{"<model>": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}`,
//! USD per million tokens. Read at start and on SIGHUP (a bad file on reload keeps the old
//! prices and logs why). Workers read through [`PriceBook::current`]: one relaxed atomic load
//! per request, and a clone of an `Arc` only when the generation changed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    /// USD for the tokens.
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.input_per_mtok + completion as f64 * self.output_per_mtok) / 1e6
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Prices(HashMap<String, Price>);

impl Prices {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let map: HashMap<String, Price> = serde_json::from_str(text)?;
        for (model, p) in &map {
            anyhow::ensure!(
                p.input_per_mtok.is_finite()
                    && p.output_per_mtok.is_finite()
                    && p.input_per_mtok >= 0.0
                    && p.output_per_mtok >= 0.0,
                "price of {model:?} must be finite and ≥ 0"
            );
        }
        Ok(Prices(map))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading IBEX_PRICES_FILE {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing IBEX_PRICES_FILE {}", path.display()))
    }

    /// USD for the tokens, `None` when the model is not priced.
    pub fn cost(&self, model: &str, prompt: u64, completion: u64) -> Option<f64> {
        Some(self.get(model)?.cost(prompt, completion))
    }

    /// The model's price, `None` when it is not priced.
    pub fn get(&self, model: &str) -> Option<Price> {
        self.0.get(model).copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The process's prices, swapped whole on reload.
#[derive(Default)]
pub struct PriceBook {
    generation: AtomicU64,
    current: RwLock<Arc<Prices>>,
}

impl PriceBook {
    pub fn new(prices: Prices) -> Self {
        PriceBook {
            generation: AtomicU64::new(1),
            current: RwLock::new(Arc::new(prices)),
        }
    }

    pub fn replace(&self, prices: Prices) {
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *cur = Arc::new(prices);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Re-reads `path`; on error keeps the old prices and says why.
    pub fn reload(&self, path: &Path) -> anyhow::Result<usize> {
        let prices = Prices::load(path)?;
        let n = prices.len();
        self.replace(prices);
        Ok(n)
    }

    /// Refreshes a worker's copy when the prices changed since it last looked.
    pub fn current(&self, local: &mut (u64, Arc<Prices>)) {
        let generation = self.generation.load(Ordering::Acquire);
        if local.0 != generation {
            let cur = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *local = (generation, cur.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_cost_per_million_and_null_when_unpriced() {
        let p = Prices::parse(r#"{"m": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}"#)
            .expect("valid");
        let c = p.cost("m", 1_000_000, 500_000).expect("priced");
        assert!((c - 0.45).abs() < 1e-12, "{c}");
        assert_eq!(p.cost("other", 1, 1), None);
        assert!(Prices::parse(r#"{"m": {"input_per_mtok": -1, "output_per_mtok": 0}}"#).is_err());
        assert!(Prices::parse(r#"{"m": {"input": 1}}"#).is_err());
        assert!(Prices::parse("[]").is_err());
    }

    #[test]
    fn workers_see_a_reload_once() {
        let book = PriceBook::new(Prices::default());
        let mut local = (0, Arc::new(Prices::default()));
        book.current(&mut local);
        assert_eq!(local.0, 1);
        book.replace(
            Prices::parse(r#"{"m": {"input_per_mtok": 1, "output_per_mtok": 2}}"#).expect("ok"),
        );
        book.current(&mut local);
        assert_eq!(local.0, 2);
        assert_eq!(local.1.len(), 1);
    }
}
