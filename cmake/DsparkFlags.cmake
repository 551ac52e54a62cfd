# Compiler flags of the kernel library.
#
# -ffp-contract=off: the shared numerics (csrc/include/dspark/numerics.h)
# must round every multiply and add separately on the host, as the device
# code does with the __f*_rn intrinsics; a fused multiply-add would change
# the last bit of a probability and break CPU/CUDA bit-equality.
# -fno-trapping-math lets GCC if-convert (and so vectorise) the selects in
# those functions; it changes no result, only the promise about FP traps.
function(dspark_set_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-O3 -ffp-contract=off -fno-math-errno -fno-trapping-math -Wall -Wextra -Wno-unused-parameter>
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -Xcompiler=-ffp-contract=off>)
endfunction()
