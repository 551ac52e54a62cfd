# Decides whether the CUDA backend is built and for which architectures.
#
#   DSPARK_CUDA        auto (default): build it when nvcc is found
#                      on: build it, and fail when nvcc is missing
#                      off: CPU only
#   DSPARK_CUDA_ARCHS  e.g. "90" or "80;90"; default: the compute capability
#                      of the visible GPUs (nvidia-smi), else "80;90"
#
# Both may also come from the environment variables of the same names.
# Sets DSPARK_WITH_CUDA and DSPARK_CUDA_ARCHS_RESOLVED.

if(NOT DEFINED DSPARK_CUDA)
  if(DEFINED ENV{DSPARK_CUDA} AND NOT "$ENV{DSPARK_CUDA}" STREQUAL "")
    set(DSPARK_CUDA "$ENV{DSPARK_CUDA}")
  else()
    set(DSPARK_CUDA "auto")
  endif()
endif()
string(TOLOWER "${DSPARK_CUDA}" DSPARK_CUDA)
if(NOT DSPARK_CUDA MATCHES "^(auto|on|off)$")
  message(FATAL_ERROR "DSPARK_CUDA must be auto, on or off, got '${DSPARK_CUDA}'")
endif()

set(DSPARK_WITH_CUDA OFF)
set(DSPARK_CUDA_ARCHS_RESOLVED "")

if(NOT DSPARK_CUDA STREQUAL "off")
  # nvcc is often installed outside PATH; look in the usual places too.
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    find_program(DSPARK_NVCC nvcc
      HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin /opt/cuda/bin)
    if(DSPARK_NVCC)
      # Resolve wrapper scripts to the real toolkit so that CMake finds its headers.
      get_filename_component(_nvcc_dir "${DSPARK_NVCC}" DIRECTORY)
      if(NOT EXISTS "${_nvcc_dir}/../include/cuda_runtime.h" AND EXISTS /usr/local/cuda/bin/nvcc)
        set(DSPARK_NVCC /usr/local/cuda/bin/nvcc)
      endif()
      set(CMAKE_CUDA_COMPILER "${DSPARK_NVCC}")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(DSPARK_WITH_CUDA ON)
  elseif(DSPARK_CUDA STREQUAL "on")
    message(FATAL_ERROR
      "DSPARK_CUDA=on but no CUDA compiler (nvcc) was found. Install the CUDA toolkit, put nvcc "
      "on PATH or set CUDACXX=/path/to/nvcc, or build with DSPARK_CUDA=off for a CPU-only build.")
  endif()
endif()

if(DSPARK_WITH_CUDA)
  if(NOT DEFINED DSPARK_CUDA_ARCHS)
    if(DEFINED ENV{DSPARK_CUDA_ARCHS} AND NOT "$ENV{DSPARK_CUDA_ARCHS}" STREQUAL "")
      set(DSPARK_CUDA_ARCHS "$ENV{DSPARK_CUDA_ARCHS}")
    endif()
  endif()
  if(DEFINED DSPARK_CUDA_ARCHS AND NOT DSPARK_CUDA_ARCHS STREQUAL "")
    string(REPLACE "," ";" DSPARK_CUDA_ARCHS_RESOLVED "${DSPARK_CUDA_ARCHS}")
    string(REPLACE "." "" DSPARK_CUDA_ARCHS_RESOLVED "${DSPARK_CUDA_ARCHS_RESOLVED}")
  else()
    find_program(DSPARK_NVIDIA_SMI nvidia-smi)
    set(_visible "")
    if(DSPARK_NVIDIA_SMI)
      execute_process(
        COMMAND "${DSPARK_NVIDIA_SMI}" --query-gpu=compute_cap --format=csv,noheader
        OUTPUT_VARIABLE _caps RESULT_VARIABLE _rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(_rc EQUAL 0 AND NOT _caps STREQUAL "")
        string(REPLACE "\n" ";" _caps "${_caps}")
        foreach(_cap IN LISTS _caps)
          string(STRIP "${_cap}" _cap)
          string(REPLACE "." "" _cap "${_cap}")
          if(_cap MATCHES "^[0-9]+$")
            list(APPEND _visible "${_cap}")
          endif()
        endforeach()
        list(REMOVE_DUPLICATES _visible)
      endif()
    endif()
    if(_visible)
      set(DSPARK_CUDA_ARCHS_RESOLVED "${_visible}")
    else()
      set(DSPARK_CUDA_ARCHS_RESOLVED "80;90")
    endif()
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${DSPARK_CUDA_ARCHS_RESOLVED}")
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
endif()
