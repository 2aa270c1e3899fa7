//! Data: ImageFolder / ImageNet datasets, JPEG decoding, torchvision-compatible transforms and a prefetching loader.
