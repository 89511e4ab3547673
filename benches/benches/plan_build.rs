//! Per-site cost of lp-core's patching logic on real gcc functions: site validation (decodes the
//! whole function), write-plan construction, both together, trampoline building, and the
//! clobber analysis.
//!
//! The functions are compiled with gcc when the benchmark starts (`-O0`, `-O2`,
//! `-O2 -fcf-protection=full`) and cut out of the object's `.text` with `nm -S` + `objcopy`.
//!
//! Run: `cargo bench -p lp-benches --bench plan_build`

use std::hint::black_box;
use std::process::Command;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lp_core::clobber::clobbered_registers;
use lp_core::plan::plan_apply;
use lp_core::site::validate_site;
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};

const SOURCE: &str = r#"
long fact(long n, long acc) { if (n <= 1) return acc; return fact(n - 1, acc * n); }
long sum(const long *p, long n) { long s = 0; for (long i = 0; i < n; i++) s += p[i] * (i + 1); return s; }
extern int factor;
int scale(int x) { return x * factor + 1; }
__attribute__((noinline)) long ext(long x) { return x * 7 + 3; }
long keep(long x) { long a = ext(x); long b = ext(a); return a + b + x; }
long many(long a, long b, long c, long d, long e, long f) {
    long g = a * b + c, h = d * e + f, i = a ^ f, j = b - e;
    for (long k = 0; k < (c & 7); k++) { g += h * k; h ^= i + k; i += j; }
    return g + h + i + j;
}
"#;

/// Where the benchmark pretends `.text` is loaded.
const BASE: u64 = 0x40_1000;

struct Function {
    label: String,
    entry: u64,
    code: Vec<u8>,
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run tool");
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
}

/// Compiles SOURCE with `flags` and returns its functions.
fn compile(tag: &str, flags: &[&str]) -> Vec<Function> {
    let dir = std::env::temp_dir().join(format!("lp-bench-plan-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("f.c");
    let obj = dir.join("f.o");
    let text = dir.join("f.text");
    std::fs::write(&src, SOURCE).unwrap();
    run(Command::new("gcc")
        .args(flags)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj));
    run(Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.text"])
        .arg(&obj)
        .arg(&text));
    let bytes = std::fs::read(&text).unwrap();
    let nm = String::from_utf8(run(Command::new("nm").arg("-S").arg(&obj))).unwrap();
    let mut functions = Vec::new();
    for line in nm.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4 && f[2] == "T" {
            let off = u64::from_str_radix(f[0], 16).unwrap();
            let size = usize::from_str_radix(f[1], 16).unwrap();
            functions.push(Function {
                label: format!("{tag}/{}({size}B)", f[3]),
                entry: BASE + off,
                code: bytes[off as usize..off as usize + size].to_vec(),
            });
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    functions
}

fn functions() -> Vec<Function> {
    let mut all = compile("O0", &["-O0", "-fcf-protection=none"]);
    all.extend(compile("O2", &["-O2", "-fcf-protection=none"]));
    all.extend(compile("O2cet", &["-O2", "-fcf-protection=full"]));
    all
}

fn bench(c: &mut Criterion) {
    let functions = functions();
    let target = BASE + 0x10_0000; // rel32 reach
    let tramp_at = BASE + 0x20_0000;

    let mut g = c.benchmark_group("validate_site");
    for f in &functions {
        g.throughput(Throughput::Bytes(f.code.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(&f.label), f, |b, f| {
            b.iter(|| validate_site(black_box(&f.code), black_box(f.entry), 5))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("plan_apply");
    for f in &functions {
        let Ok(site) = validate_site(&f.code, f.entry, 5) else {
            continue;
        };
        g.bench_with_input(BenchmarkId::from_parameter(&f.label), &site, |b, site| {
            b.iter(|| plan_apply(black_box(site), black_box(site.displaced()), target))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("site_and_plan");
    for f in &functions {
        if validate_site(&f.code, f.entry, 5).is_err() {
            continue;
        }
        g.bench_with_input(BenchmarkId::from_parameter(&f.label), f, |b, f| {
            b.iter(|| {
                let site = validate_site(black_box(&f.code), black_box(f.entry), 5).unwrap();
                plan_apply(&site, site.displaced(), target).unwrap()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("build_trampoline");
    for f in &functions {
        let Ok(site) = validate_site(&f.code, f.entry, 5) else {
            continue;
        };
        g.bench_with_input(BenchmarkId::from_parameter(&f.label), &site, |b, site| {
            let mut out = [0u8; MAX_TRAMPOLINE_LEN];
            b.iter(|| build_trampoline(black_box(site), tramp_at, &mut out).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("clobbered_registers");
    for f in &functions {
        g.throughput(Throughput::Bytes(f.code.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(&f.label), f, |b, f| {
            b.iter(|| clobbered_registers(black_box(&f.code), black_box(f.entry)).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .sample_size(30);
    targets = bench
}
criterion_main!(benches);
