//! The CPU this process runs on, as far as ONNX Runtime's kernels care.
//!
//! ONNX Runtime picks its matrix kernels by CPU feature at run time, and for integer (int8)
//! matmuls the choice changes the numbers, not just the speed: on x86-64 without VNNI the
//! u8 x s8 kernel adds pairs of products in 16 bits with saturation, so one `transformer.int8.onnx`
//! computes different logits on an AVX2-only CPU than on an AVX-512 VNNI one. This file names the
//! features that decide the kernel ([`CpuInfo`]) and the kernel class they give ([`Int8Kernel`]),
//! so `absorb info`, `/v1/model` and the variant check can say what they ran on. It detects; it
//! does not choose kernels (ONNX Runtime does).

use serde::Serialize;

/// Which integer matmul kernel family ONNX Runtime's CPU provider uses here.
///
/// The names are the ones `export/variants.py` records measurements under
/// (`provenance.metrics.variants.int8.agreement_by_cpu`), so a bundle can say how its int8
/// variant fared on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Int8Kernel {
    /// x86-64 with AMX (AMX-INT8 tiles).
    Amx,
    /// x86-64 with AVX-512 VNNI (`vpdpbusd`, 32-bit accumulation).
    Avx512Vnni,
    /// x86-64 with AVX-VNNI (the VEX-coded VNNI of client CPUs).
    AvxVnni,
    /// x86-64 with AVX-512 BW but no VNNI: 16-bit saturating pair sums (`vpmaddubsw`).
    Avx512Core,
    /// x86-64 with AVX2 but no VNNI: 16-bit saturating pair sums (`vpmaddubsw`).
    Avx2,
    /// Older x86-64 (SSE4.1 and below).
    Sse,
    /// aarch64 with the int8 matrix multiply extension (`smmla`).
    I8mm,
    /// aarch64 with the dot-product extension (`sdot`/`udot`; every Jetson Orin and Xavier).
    Dotprod,
    /// aarch64 with plain NEON only (Jetson Nano, TX2).
    Neon,
    /// Another architecture.
    Other,
}

impl Int8Kernel {
    /// The name recorded in bundles and printed by `absorb info`.
    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Amx => "amx",
            Int8Kernel::Avx512Vnni => "avx512_vnni",
            Int8Kernel::AvxVnni => "avx_vnni",
            Int8Kernel::Avx512Core => "avx512_core",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::Sse => "sse",
            Int8Kernel::I8mm => "i8mm",
            Int8Kernel::Dotprod => "dotprod",
            Int8Kernel::Neon => "neon",
            Int8Kernel::Other => "other",
        }
    }

    /// The CPU feature that would give this kernel, as `/proc/cpuinfo` spells it.
    pub fn feature(self) -> &'static str {
        match self {
            Int8Kernel::Amx => "amx_int8",
            Int8Kernel::Avx512Vnni => "avx512_vnni",
            Int8Kernel::AvxVnni => "avx_vnni",
            Int8Kernel::Avx512Core => "avx512bw",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::Sse => "sse4_1",
            Int8Kernel::I8mm => "i8mm",
            Int8Kernel::Dotprod => "asimddp",
            Int8Kernel::Neon => "asimd",
            Int8Kernel::Other => "none",
        }
    }
}

/// What `absorb info` and `/v1/model` report about the CPU.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// `x86_64`, `aarch64`, ...
    pub arch: &'static str,
    /// The `model name` line of `/proc/cpuinfo`, when there is one.
    pub model: Option<String>,
    /// The kernel-deciding features present, in `/proc/cpuinfo` spelling.
    pub features: Vec<&'static str>,
    /// The int8 kernel family they give.
    pub int8_kernel: Int8Kernel,
}

/// Detects the CPU's features (through the standard library's run-time detection, which asks
/// the CPU itself, or the kernel's auxiliary vector on aarch64).
pub fn detect() -> CpuInfo {
    let (features, int8_kernel) = detect_features();
    CpuInfo {
        arch: std::env::consts::ARCH,
        model: model_name(),
        features,
        int8_kernel,
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_features() -> (Vec<&'static str>, Int8Kernel) {
    use std::arch::is_x86_feature_detected as has;
    let found = [
        ("sse4_1", has!("sse4.1")),
        ("avx2", has!("avx2")),
        ("fma", has!("fma")),
        ("avx512f", has!("avx512f")),
        ("avx512bw", has!("avx512bw")),
        ("avx512_vnni", has!("avx512vnni")),
        ("avx_vnni", has!("avxvnni")),
        // The standard library's AMX detection is not stable yet; the kernel lists AMX in
        // /proc/cpuinfo only when it also enables the tile state, which is what ONNX Runtime needs.
        ("amx_tile", proc_flag("amx_tile")),
        ("amx_int8", proc_flag("amx_int8")),
    ];
    let on = |name: &str| found.iter().any(|&(n, yes)| yes && n == name);
    let kernel = if on("amx_int8") && on("amx_tile") {
        Int8Kernel::Amx
    } else if on("avx512_vnni") {
        Int8Kernel::Avx512Vnni
    } else if on("avx_vnni") {
        Int8Kernel::AvxVnni
    } else if on("avx512bw") {
        Int8Kernel::Avx512Core
    } else if on("avx2") {
        Int8Kernel::Avx2
    } else {
        Int8Kernel::Sse
    };
    let features = found.iter().filter(|f| f.1).map(|f| f.0).collect();
    (features, kernel)
}

#[cfg(target_arch = "aarch64")]
fn detect_features() -> (Vec<&'static str>, Int8Kernel) {
    use std::arch::is_aarch64_feature_detected as has;
    let found = [
        ("asimd", has!("neon")),
        ("asimddp", has!("dotprod")),
        ("i8mm", has!("i8mm")),
        ("sve", has!("sve")),
    ];
    let on = |name: &str| found.iter().any(|&(n, yes)| yes && n == name);
    let kernel = if on("i8mm") {
        Int8Kernel::I8mm
    } else if on("asimddp") {
        Int8Kernel::Dotprod
    } else {
        Int8Kernel::Neon
    };
    let features = found.iter().filter(|f| f.1).map(|f| f.0).collect();
    (features, kernel)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect_features() -> (Vec<&'static str>, Int8Kernel) {
    (Vec::new(), Int8Kernel::Other)
}

#[cfg(target_arch = "x86_64")]
fn proc_flag(name: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|text| {
        text.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == name))
    })
}

fn model_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// What a bundle records about one precision variant's agreement with fp32, per int8 kernel
/// class (`provenance.metrics.variants.NAME`): `bar` is the agreement the bundle promises,
/// `agreement_by_cpu` what was measured on each class.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantRecord {
    /// The least argmax agreement with fp32 the bundle's tests accept.
    pub bar: f64,
    /// Measured agreement by [`Int8Kernel::name`].
    pub by_cpu: Vec<(String, f64)>,
}

impl VariantRecord {
    /// Reads the record of `variant` from a manifest's free-form provenance; `None` when the
    /// bundle records no per-CPU measurement (bundles made before it did).
    pub fn from_provenance(provenance: &serde_json::Map<String, serde_json::Value>, variant: &str) -> Option<Self> {
        let v = provenance.get("metrics")?.get("variants")?.get(variant)?;
        let bar = v.get("bar")?.as_f64()?;
        let by_cpu = v
            .get("agreement_by_cpu")?
            .as_object()?
            .iter()
            .filter_map(|(k, a)| Some((k.clone(), a.as_f64()?)))
            .collect();
        Some(VariantRecord { bar, by_cpu })
    }

    /// A warning when the variant is known to fall below its bar on `kernel`: names the measured
    /// agreement and the features of the classes where it held. `None` when it held here or was
    /// not measured here.
    pub fn warning(&self, variant: &str, kernel: Int8Kernel) -> Option<String> {
        let (_, here) = self.by_cpu.iter().find(|(k, _)| k == kernel.name())?;
        if *here >= self.bar {
            return None;
        }
        let held: Vec<String> = self
            .by_cpu
            .iter()
            .filter(|(_, a)| *a >= self.bar)
            .map(|(k, a)| format!("{} ({a:.3})", feature_of(k)))
            .collect();
        let missing = if held.is_empty() {
            String::new()
        } else {
            format!("; it holds on CPUs with {}, which this one lacks", held.join(", "))
        };
        Some(format!(
            "the {variant} transformer agrees with fp32 on {:.1}% of tokens on CPUs like this one \
             (int8 kernel {}), below the bundle's bar of {:.1}%{missing}: use the fp32 transformer \
             (no --variant) or a variant quantized for this CPU (python -m export variants)",
            here * 100.0,
            kernel.name(),
            self.bar * 100.0
        ))
    }
}

fn feature_of(kernel_name: &str) -> &'static str {
    [
        Int8Kernel::Amx,
        Int8Kernel::Avx512Vnni,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx512Core,
        Int8Kernel::Avx2,
        Int8Kernel::Sse,
        Int8Kernel::I8mm,
        Int8Kernel::Dotprod,
        Int8Kernel::Neon,
    ]
    .into_iter()
    .find(|k| k.name() == kernel_name)
    .map_or("an unknown feature", Int8Kernel::feature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: serde_json::Value) -> Option<VariantRecord> {
        VariantRecord::from_provenance(json.as_object().unwrap(), "int8")
    }

    #[test]
    fn detection_names_a_kernel_of_this_architecture() {
        let info = detect();
        assert_eq!(info.arch, std::env::consts::ARCH);
        #[cfg(target_arch = "x86_64")]
        assert!(!matches!(
            info.int8_kernel,
            Int8Kernel::I8mm | Int8Kernel::Dotprod | Int8Kernel::Neon | Int8Kernel::Other
        ));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            info.features.contains(&"avx2"),
            std::arch::is_x86_feature_detected!("avx2")
        );
    }

    #[test]
    fn a_variant_below_its_bar_here_warns_naming_the_missing_feature() {
        let r = record(serde_json::json!({"metrics": {"variants": {"int8": {
            "bar": 0.95, "agreement_by_cpu": {"avx2": 0.85, "avx512_vnni": 0.992}}}}}))
        .unwrap();
        let w = r.warning("int8", Int8Kernel::Avx2).unwrap();
        assert!(w.contains("85.0%") && w.contains("95.0%"), "{w}");
        assert!(w.contains("avx512_vnni (0.992)"), "{w}");
        assert_eq!(r.warning("int8", Int8Kernel::Avx512Vnni), None);
        // not measured on this class: nothing to say
        assert_eq!(r.warning("int8", Int8Kernel::Dotprod), None);
    }

    #[test]
    fn bundles_without_a_per_cpu_record_give_none() {
        assert_eq!(record(serde_json::json!({})), None);
        assert_eq!(
            record(serde_json::json!({"metrics": {"variants": {"int8": {"argmax_agreement": 0.99}}}})),
            None
        );
    }
}
