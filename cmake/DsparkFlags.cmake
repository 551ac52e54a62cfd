# Compiler flags of the kernel library.
#
# -ffp-contract=off: the shared numerics (csrc/include/dspark/numerics.h)
# must round every multiply and add separately on the host, as the device
# code does with the __f*_rn intrinsics; a fused multiply-add would change
# the last bit of a probability and break CPU/CUDA bit-equality.
# -fno-trapping-math lets GCC if-convert (and so vectorise) the selects in
# those functions; it changes no result, only the promise about FP traps.
#
# DSPARK_SANITIZE=address,undefined (any -fsanitize= list) instruments the host
# code: every finding aborts (-fno-sanitize-recover), so a test run fails on
# it. Meant for a CPU-only build (DSPARK_CUDA=off) in its own build directory.
set(DSPARK_SANITIZE "" CACHE STRING "Sanitizers for the host code, e.g. address,undefined (empty: none)")
if(DSPARK_SANITIZE)
  if(DSPARK_WITH_CUDA)
    message(WARNING "dspark: DSPARK_SANITIZE instruments host code only; configure with DSPARK_CUDA=off")
  endif()
  message(NOTICE "dspark: sanitizers ${DSPARK_SANITIZE}")
  set(_dspark_sanitize_flags -fsanitize=${DSPARK_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
endif()

function(dspark_set_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-O3 -ffp-contract=off -fno-math-errno -fno-trapping-math -Wall -Wextra -Wno-unused-parameter>
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -Xcompiler=-ffp-contract=off>)
  if(DSPARK_SANITIZE)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${_dspark_sanitize_flags}>)
    target_link_options(${target} PRIVATE ${_dspark_sanitize_flags})
  endif()
endfunction()
