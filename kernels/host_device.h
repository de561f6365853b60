// KVC_HOST_DEVICE marks inline functions shared by the CPU reference and CUDA kernels.
#ifndef KVCOMPRESS_KERNELS_HOST_DEVICE_H_
#define KVCOMPRESS_KERNELS_HOST_DEVICE_H_

#if defined(__CUDACC__)
#define KVC_HOST_DEVICE __host__ __device__
#else
#define KVC_HOST_DEVICE
#endif

#endif  // KVCOMPRESS_KERNELS_HOST_DEVICE_H_
