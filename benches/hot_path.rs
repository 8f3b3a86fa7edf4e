//! Micro-benchmarks of the request path's building blocks (`cargo bench --bench hot_path`):
//! route lookup, `pick()` for every balancer (and weighted round robin, and a 5% split) over
//! 3/100/1000 instances, and building and swapping a table.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use switchyard::balance::hash::hash_bytes;
use switchyard::balance::BalanceSettings;
use switchyard::config::{Balance, Config, ConsulEnv, SplitConfig};
use switchyard::gateway::Router;
use switchyard::metrics::Metrics;
use switchyard::upstream::{Instance, ServiceTable, Tried, Upstreams};

fn instances(count: usize) -> Vec<Instance> {
    (0..count)
        .map(|n| {
            Instance::new(
                format!("web-{n:05}"),
                format!("10.0.{}.{}", n / 250, n % 250 + 1),
                8080,
                vec!["v1".into()],
                BTreeMap::new(),
            )
            .expect("a valid instance")
        })
        .collect()
}

fn config(services: usize) -> Config {
    let mut yaml = String::from("services:\n");
    for n in 0..services {
        yaml.push_str(&format!(
            "  - name: svc{n}\n    route: {{path_prefix: /svc{n}/}}\n"
        ));
    }
    Config::from_yaml(&yaml, &ConsulEnv::default()).expect("a valid config")
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    for services in [10, 100, 1000] {
        let config = config(services);
        let metrics = Metrics::new().unwrap();
        let router = Router::new(&Upstreams::new(&config.services, &metrics));
        let path = format!("/svc{}/orders/42?expand=1", services / 2);
        group.bench_with_input(BenchmarkId::from_parameter(services), &path, |b, path| {
            b.iter(|| {
                black_box(router.find(black_box(Some("example.com")), black_box(path))).is_some()
            })
        });
    }
    group.finish();
}

fn settings(balance: Balance) -> BalanceSettings {
    BalanceSettings {
        balance,
        splits: vec![],
    }
}

/// Weights 1, 2, 3, 1, 2, 3... (a smooth weighted cycle, or cumulative weights).
fn weighted(count: usize) -> Vec<Instance> {
    instances(count)
        .into_iter()
        .enumerate()
        .map(|(n, i)| i.with_weight(n as u32 % 3 + 1))
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let canary = BalanceSettings {
        balance: Balance::RoundRobin,
        splits: vec![SplitConfig {
            tags: vec!["canary".into()],
            basis_points: 500,
        }],
    };
    for count in [3, 100, 1000] {
        let mut tables: Vec<(String, ServiceTable)> = Balance::ALL
            .iter()
            .map(|&b| {
                (
                    b.as_str().to_owned(),
                    ServiceTable::new(instances(count), &settings(b)),
                )
            })
            .collect();
        for balance in [Balance::RoundRobin, Balance::Random] {
            let table = ServiceTable::new(weighted(count), &settings(balance));
            tables.push((format!("{}_weighted", balance.as_str()), table));
        }
        let mut split_set = instances(count);
        split_set[0].tags = vec!["canary".into()];
        tables.push(("split_5pc".into(), ServiceTable::new(split_set, &canary)));
        for (name, table) in &tables {
            let tried = Tried::default();
            let hashed = name == "hash";
            let mut key = hash_bytes(b"user-42");
            group.bench_with_input(
                BenchmarkId::new(name, count),
                table,
                |b, table| match hashed {
                    // Another user per request.
                    true => b.iter(|| {
                        key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        black_box(table.pick(black_box(&tried), Some(key))).map(|(i, _)| i)
                    }),
                    false => {
                        b.iter(|| black_box(table.pick(black_box(&tried), None)).map(|(i, _)| i))
                    }
                },
            );
        }
    }
    group.finish();
}

fn table_build_and_swap(c: &mut Criterion) {
    let mut group = c.benchmark_group("table");
    for count in [3, 100, 1000] {
        group.bench_with_input(BenchmarkId::new("build", count), &count, |b, &count| {
            let set = instances(count);
            b.iter(|| {
                black_box(ServiceTable::new(
                    set.clone(),
                    &settings(Balance::RoundRobin),
                ))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("build_hash", count),
            &count,
            |b, &count| {
                let set = instances(count);
                b.iter(|| black_box(ServiceTable::new(set.clone(), &settings(Balance::Hash))))
            },
        );
        let config = config(1);
        let metrics = Metrics::new().unwrap();
        let upstreams = Upstreams::new(&config.services, &metrics);
        let upstream = upstreams.iter().next().unwrap().clone();
        let (a, b_set) = (instances(count), instances(count + 1));
        let mut flip = false;
        group.bench_with_input(
            BenchmarkId::new("replace_changed", count),
            &count,
            |b, _| {
                b.iter(|| {
                    flip = !flip;
                    upstream.replace_instances(if flip { a.clone() } else { b_set.clone() })
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("replace_unchanged", count),
            &count,
            |b, _| {
                upstream.replace_instances(a.clone());
                b.iter(|| upstream.replace_instances(a.clone()))
            },
        );
    }
    group.finish();
}

criterion_group!(benches, route_lookup, pick, table_build_and_swap);
criterion_main!(benches);
