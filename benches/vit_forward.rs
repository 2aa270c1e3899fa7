//! ViT forward on the CPU (fp32, no grad): vit_base_patch16_224 at batch 8 and the tiny vit_pico_patch4_32 at
//! batch 64. `scripts/bench_vit_forward.sh` runs this beside the same forward in PyTorch/timm and writes the ratio.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lmim_bench::model::{VisionTransformer, VitConfig};
use tch::{nn, Device, Kind, Tensor};

fn forward(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let mut group = c.benchmark_group("vit_forward_cpu");
    group.sample_size(10);
    for (arch, batch) in [("vit_base_patch16_224", 8i64), ("vit_pico_patch4_32", 64)] {
        let cfg = VitConfig::from_arch(arch).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = VisionTransformer::new(&vs.root(), &cfg);
        let x = Tensor::randn([batch, 3, cfg.img_size, cfg.img_size], (Kind::Float, Device::Cpu));
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new(arch, batch), &x, |b, x| b.iter(|| model.forward_features(x, &[], false).tokens));
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
