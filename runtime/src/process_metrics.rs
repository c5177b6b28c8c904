//! The standard `process_*` metrics (CPU, memory, file descriptors, threads) of the
//! current process, read from procfs at each scrape. Dashboards use them for the
//! control plane's and the node agents' footprint.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Register on an unprefixed registry: the names are the conventional ones.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// One reading of the current process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
    pub start_time_seconds: f64,
}

impl ProcessSample {
    pub fn current() -> procfs::ProcResult<Self> {
        let me = procfs::process::Process::myself()?;
        let stat = me.stat()?;
        let ticks = procfs::ticks_per_second() as f64;
        let boot = procfs::boot_time_secs()? as f64;
        let max_fds = match me.limits()?.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => Some(v),
            procfs::process::LimitValue::Unlimited => None,
        };
        Ok(Self {
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            resident_bytes: stat.rss * procfs::page_size(),
            virtual_bytes: stat.vsize,
            open_fds: me.fd_count()? as u64,
            max_fds,
            threads: u64::try_from(stat.num_threads).unwrap_or(0),
            start_time_seconds: boot + stat.starttime as f64 / ticks,
        })
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // An unreadable /proc (never on Linux) leaves the metrics out rather than
        // failing the whole scrape.
        let Ok(s) = ProcessSample::current() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(enc.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            s.resident_bytes as f64,
        )?;
        gauge(
            &mut enc,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            s.virtual_bytes as f64,
        )?;
        gauge(
            &mut enc,
            "process_open_fds",
            "Open file descriptors",
            s.open_fds as f64,
        )?;
        if let Some(m) = s.max_fds {
            gauge(
                &mut enc,
                "process_max_fds",
                "Limit on open file descriptors",
                m as f64,
            )?;
        }
        gauge(&mut enc, "process_threads", "OS threads", s.threads as f64)?;
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since the unix epoch, in seconds",
            s.start_time_seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn exposes_this_process() {
        let s = ProcessSample::current().unwrap();
        assert!(s.resident_bytes > 0 && s.threads >= 1 && s.open_fds >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86400.0);

        let mut r = Registry::default();
        r.register_collector(Box::new(ProcessCollector));
        let text = crate::encode_metrics(&r);
        for name in [
            "# TYPE process_cpu_seconds counter",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_threads ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
