//! Data: ImageFolder / ImageNet datasets, JPEG decoding, torchvision-compatible transforms and a prefetching loader.
//!
//! - [`dataset`]: `Dataset::open(root, split)` over ImageFolder trees, the flat ImageNet val layout and folders of
//!   tar shards, with a fingerprint for results records.
//! - [`index`]: the scan's result (paths, labels, sizes, fingerprint), cached and shared by rank 0.
//! - [`shards`]: WebDataset-style tar shards: `data pack`, and random access through an offset index.
//! - [`decode`]: bytes to RGB (zune-jpeg for JPEG, or libjpeg-turbo with the `turbojpeg` feature; the `image`
//!   crate for PNG).
//! - [`transforms`]: `RandomResizedCrop`, `RandomHorizontalFlip`, `Resize` + `CenterCrop`, `ToTensor` + `Normalize`,
//!   matching torchvision on PIL images.
//! - [`loader`]: worker threads that decode and augment ahead into a bounded queue; deterministic shuffle, sharding
//!   and resumable positions.
//! - [`fmnist`] and [`synth`]: the demo dataset (Debian's Fashion-MNIST) and generated ImageFolder trees.
//! - [`davis`]: the DAVIS-2017 layout, DINO's frame and annotation reading, and generated video sets.
pub mod ade20k;
pub mod augment;
pub mod dataset;
pub mod davis;
pub mod decode;
pub mod fmnist;
pub mod index;
pub mod loader;
pub mod pil_resample;
pub mod shards;
pub mod synth;
pub mod transforms;

pub use dataset::{Dataset, Fingerprint, OpenOptions, ScanFlags};
pub use decode::{decode_image, load_rgb, RgbImage};
pub use loader::{sample_rng, Batch, EpochIter, Loader, LoaderConfig};
pub use transforms::{CropBox, Interp, Op, Transform, IMAGENET_MEAN, IMAGENET_STD};
