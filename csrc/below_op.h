// A guard for the ATen calls inside an op's kernel (shared by the CPU and CUDA ops).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace cube {

// For the ATen calls inside an op's kernel: they are neither recorded by autograd nor cast by
// an autocast region around the call (the op's dtype is its inputs').
struct AtenBelowTheOp {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

}  // namespace cube
