//! `GET /metrics`: Prometheus text format (version 0.0.4), written by hand — it is a few lines
//! per series and needs no library.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use bulwark_channel::VmInfo;

use crate::store::{VmRecord, VmState};

#[derive(Debug, Default)]
struct RouteStats {
    /// Requests by status code.
    by_status: BTreeMap<u16, u64>,
    seconds_sum: f64,
    count: u64,
}

/// The daemon's own counters.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, RouteStats>>,
}

/// A label value, escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one request of `route` (`METHOD /template`) that ended with `status`.
    pub fn record(&self, route: &str, status: u16, took: Duration) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let s = routes.entry(route.to_string()).or_default();
        *s.by_status.entry(status).or_default() += 1;
        s.seconds_sum += took.as_secs_f64();
        s.count += 1;
    }

    /// The whole exposition: the daemon's series, then each VM's.
    pub fn render(&self, vms: &[(VmRecord, Option<VmInfo>)]) -> String {
        let mut o = String::new();
        {
            let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            o.push_str("# HELP bulwark_api_requests_total API requests by route and status.\n");
            o.push_str("# TYPE bulwark_api_requests_total counter\n");
            for (route, s) in routes.iter() {
                for (status, n) in &s.by_status {
                    let _ = writeln!(
                        o,
                        "bulwark_api_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                        esc(route)
                    );
                }
            }
            o.push_str(
                "# HELP bulwark_api_request_duration_seconds Time to answer API requests.\n",
            );
            o.push_str("# TYPE bulwark_api_request_duration_seconds summary\n");
            for (route, s) in routes.iter() {
                let r = esc(route);
                let _ = writeln!(
                    o,
                    "bulwark_api_request_duration_seconds_sum{{route=\"{r}\"}} {}",
                    s.seconds_sum
                );
                let _ = writeln!(
                    o,
                    "bulwark_api_request_duration_seconds_count{{route=\"{r}\"}} {}",
                    s.count
                );
            }
        }
        let header = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut o,
            "bulwark_vm_state",
            "gauge",
            "1 for the state the VM is in.",
        );
        for (rec, live) in vms {
            let vm = esc(&rec.name);
            let current = match live.as_ref().map(|i| i.state) {
                Some(bulwark_channel::RunState::Paused) => VmState::Paused,
                _ => rec.state,
            };
            for st in VmState::ALL {
                let _ = writeln!(
                    o,
                    "bulwark_vm_state{{vm=\"{vm}\",state=\"{}\"}} {}",
                    st.name(),
                    u8::from(st == current)
                );
            }
        }
        header(
            &mut o,
            "bulwark_vm_exits_total",
            "counter",
            "VM exits of the current run (the last run's total once stopped).",
        );
        for (rec, live) in vms {
            let vm = esc(&rec.name);
            if let Some(i) = live {
                for (kind, n) in [
                    ("io", i.exits.io),
                    ("mmio", i.exits.mmio),
                    ("hostcall", i.exits.hostcalls),
                    ("all", i.exits.total),
                ] {
                    let _ = writeln!(
                        o,
                        "bulwark_vm_exits_total{{vm=\"{vm}\",kind=\"{kind}\"}} {n}"
                    );
                }
            } else if let Some(x) = &rec.last_exit {
                let _ = writeln!(
                    o,
                    "bulwark_vm_exits_total{{vm=\"{vm}\",kind=\"all\"}} {}",
                    x.exits
                );
            }
        }
        header(
            &mut o,
            "bulwark_vm_vcpu_seconds_total",
            "counter",
            "CPU time of the VM's vCPU threads.",
        );
        for (rec, live) in vms {
            if let Some(i) = live {
                let _ = writeln!(
                    o,
                    "bulwark_vm_vcpu_seconds_total{{vm=\"{}\"}} {}",
                    esc(&rec.name),
                    i.vcpu_time_ns as f64 / 1e9
                );
            }
        }
        header(
            &mut o,
            "bulwark_vm_uptime_seconds",
            "gauge",
            "Time since the VM's monitor started.",
        );
        for (rec, live) in vms {
            if let Some(i) = live {
                let _ = writeln!(
                    o,
                    "bulwark_vm_uptime_seconds{{vm=\"{}\"}} {}",
                    esc(&rec.name),
                    i.uptime_ms as f64 / 1e3
                );
            }
        }
        header(
            &mut o,
            "bulwark_vm_device_bytes_total",
            "counter",
            "Bytes a device moved, by direction (in: to the guest, out: from it).",
        );
        for (rec, live) in vms {
            for d in live.iter().flat_map(|i| &i.devices) {
                for (dir, key) in [("in", "bytes_in"), ("out", "bytes_out")] {
                    if let Some(n) = d.counters.get(key) {
                        let _ = writeln!(
                            o,
                            "bulwark_vm_device_bytes_total{{vm=\"{}\",device=\"{}\",direction=\"{dir}\"}} {n}",
                            esc(&rec.name),
                            esc(&d.name)
                        );
                    }
                }
            }
        }
        header(
            &mut o,
            "bulwark_vm_device_requests_total",
            "counter",
            "Requests a device served.",
        );
        for (rec, live) in vms {
            for d in live.iter().flat_map(|i| &i.devices) {
                if let Some(n) = d.counters.get("requests") {
                    let _ = writeln!(
                        o,
                        "bulwark_vm_device_requests_total{{vm=\"{}\",device=\"{}\"}} {n}",
                        esc(&rec.name),
                        esc(&d.name)
                    );
                }
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_requests_by_route_and_status() {
        let m = Metrics::default();
        m.record("GET /v1/vms", 200, Duration::from_millis(2));
        m.record("GET /v1/vms", 200, Duration::from_millis(2));
        m.record("GET /v1/vms", 401, Duration::from_millis(1));
        let text = m.render(&[]);
        assert!(
            text.contains("bulwark_api_requests_total{route=\"GET /v1/vms\",status=\"200\"} 2")
        );
        assert!(
            text.contains("bulwark_api_requests_total{route=\"GET /v1/vms\",status=\"401\"} 1")
        );
        assert!(
            text.contains("bulwark_api_request_duration_seconds_count{route=\"GET /v1/vms\"} 3")
        );
        assert_eq!(esc("a\"b\\"), "a\\\"b\\\\");
    }
}
