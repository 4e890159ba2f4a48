// What the emulator's loader appends to a module's kernel text: for each kernel
// (a name expression such as `bias_act<float>`), a launcher that unpacks the
// driver's array of pointers to argument values, and the kernel's parameter
// types, which the loader checks every argument against.
#ifndef CUDA_EMULATOR_ENTRY_H
#define CUDA_EMULATOR_ENTRY_H

#include <type_traits>
#include <utility>

struct cuemu_param {
  int pointer;   // 1 for a pointer parameter; kind and size then describe what it points to
  int kind;      // 'f' float, 'i' signed integer, 'u' unsigned integer, 'b' bool, 'v' void, 's' other
  int size;      // bytes
  int is_const;  // a pointer to const
  int align;     // a pointer's: the alignment (bytes) its pointee needs, which every access through it must keep
};

struct cuemu_kernel {
  const char* name;
  void (*invoke)(void**);
  int count;
  const cuemu_param* params;
};

namespace cuemu {
template <typename T> constexpr int kind_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, bool>) return 'b';
  else if constexpr (std::is_floating_point_v<U>) return 'f';
  else if constexpr (std::is_integral_v<U>) return std::is_signed_v<U> ? 'i' : 'u';
  else if constexpr (std::is_void_v<U>) return 'v';
  else return 's';
}

template <typename T> constexpr int size_of() {
  if constexpr (std::is_void_v<T>) return 0;
  else return (int)sizeof(T);
}

template <typename T> constexpr int align_of() {
  if constexpr (std::is_void_v<T>) return 1;
  else return (int)alignof(T);
}

template <typename P> constexpr cuemu_param describe() {
  if constexpr (std::is_pointer_v<P>) {
    using E = std::remove_pointer_t<P>;
    return {1, kind_of<E>(), size_of<E>(), std::is_const_v<E>, align_of<E>()};
  } else {
    return {0, kind_of<P>(), (int)sizeof(P), 0, 1};
  }
}

template <typename... P> struct Entry {
  template <void (*K)(P...), size_t... I> static void call(void** args, std::index_sequence<I...>) {
    K(*static_cast<P*>(args[I])...);
  }
  template <void (*K)(P...)> static void invoke(void** args) { call<K>(args, std::index_sequence_for<P...>{}); }
  static constexpr int count = sizeof...(P);
  static constexpr cuemu_param params[sizeof...(P) ? sizeof...(P) : 1] = {describe<P>()...};
};

template <typename... P> Entry<P...> entry_for(void (*)(P...));
}  // namespace cuemu

#define CUEMU_ENTRY(index, ...)                                                                      \
  extern "C" const cuemu_kernel* cuemu_kernel_##index() {                                           \
    using E = decltype(cuemu::entry_for(&__VA_ARGS__));                                             \
    static const cuemu_kernel kernel = {#__VA_ARGS__, &E::template invoke<&__VA_ARGS__>,            \
                                        E::count, E::params};                                       \
    return &kernel;                                                                                 \
  }

#endif  // CUDA_EMULATOR_ENTRY_H
