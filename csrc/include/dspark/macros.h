// Portability macros shared by the CPU and CUDA backends.
#pragma once

#if defined(__CUDACC__)
#define DSPARK_HD __host__ __device__
#define DSPARK_DEVICE __device__
#else
#define DSPARK_HD
#define DSPARK_DEVICE
#endif

#if defined(__CUDACC__)
#define DSPARK_INLINE __forceinline__
#elif defined(__GNUC__)
#define DSPARK_INLINE inline __attribute__((always_inline))
#else
#define DSPARK_INLINE inline
#endif

#if defined(__GNUC__) || defined(__CUDACC__)
#define DSPARK_RESTRICT __restrict__
#else
#define DSPARK_RESTRICT
#endif
