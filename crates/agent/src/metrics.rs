//! Prometheus metrics (text exposition format at `/metrics`).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Downtime histogram buckets, in milliseconds.
const DOWNTIME_BUCKETS_MS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0];

/// Counters and the migration downtime histogram.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<String, u64>>,
    sums: Mutex<BTreeMap<String, (f64, u64)>>,
    downtime: Mutex<(Vec<u64>, f64, u64)>,
}

impl Metrics {
    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn add(&self, name: &str, v: u64) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.into())
            .or_default() += v;
    }

    /// Records one observation of a summary (sum and count).
    pub fn observe(&self, name: &str, v: f64) {
        let mut s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let e = s.entry(name.into()).or_default();
        e.0 += v;
        e.1 += 1;
    }

    pub fn observe_downtime(&self, ms: f64) {
        let mut d = self.downtime.lock().unwrap_or_else(|e| e.into_inner());
        if d.0.is_empty() {
            d.0 = vec![0; DOWNTIME_BUCKETS_MS.len()];
        }
        for (i, b) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                d.0[i] += 1;
            }
        }
        d.1 += ms / 1e3;
        d.2 += 1;
    }

    /// The exposition text; `gauges` adds point-in-time values (name, help, value).
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        for (name, help, v) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
        for (k, v) in self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push_str(&format!("# TYPE {k} counter\n{k} {v}\n"));
        }
        for (k, (sum, n)) in self.sums.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push_str(&format!(
                "# TYPE {k} summary\n{k}_sum {sum}\n{k}_count {n}\n"
            ));
        }
        let d = self.downtime.lock().unwrap_or_else(|e| e.into_inner());
        let name = "ferry_migration_downtime_seconds";
        out.push_str(&format!(
            "# HELP {name} Live migration downtime (VM paused).\n# TYPE {name} histogram\n"
        ));
        for (i, b) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
            let c = d.0.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{name}_bucket{{le=\"{}\"}} {c}\n", b / 1e3));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            d.2, d.1, d.2
        ));
        out
    }
}
