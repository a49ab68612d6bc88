# The op library must share the process's C++ runtime (the libstdc++.so.6 that Python and torch load).
#
# A GCC toolchain whose `libstdc++.so` development link is missing (seen on the GPU machine: /opt/gcc/bin/g++ and
# /usr/bin/g++ both answer `-print-file-name=libstdc++.so` with the bare name) resolves `-lstdc++` to libstdc++.a
# and silently copies a second C++ runtime into the extension. Its std::locale facets are then indexed against the
# other runtime's, and the first `ostream << number` in our code (every TORCH_CHECK message with a size or an id)
# dereferences a facet that does not exist: SIGSEGV instead of an error (issue 8). Linking the shared runtime
# explicitly, before the driver's implicit -lstdc++, keeps the archive out.
# Sets FUSEDRL_LIBSTDCXX to the library to link, or leaves it empty when the toolchain already links it shared.
set(FUSEDRL_LIBSTDCXX "")
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_SYSTEM_NAME STREQUAL "Linux")
  execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libstdc++.so
                  OUTPUT_VARIABLE _fusedrl_stdcxx_dev OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT IS_ABSOLUTE "${_fusedrl_stdcxx_dev}")
    # The runtime Python has mapped once torch is imported: the one our symbols must bind to.
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
              "import torch; print(next((l.split()[-1] for l in open('/proc/self/maps') if '/libstdc++.so' in l), ''))"
      OUTPUT_VARIABLE _fusedrl_stdcxx_runtime OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT _fusedrl_stdcxx_runtime)
      message(FATAL_ERROR "fusedrl: ${CMAKE_CXX_COMPILER} would link libstdc++ statically (no libstdc++.so link) "
                          "and the shared libstdc++ used by Python could not be found; install the compiler's "
                          "libstdc++ development package (e.g. libstdc++-13-dev)")
    endif()
    set(FUSEDRL_LIBSTDCXX "${_fusedrl_stdcxx_runtime}")
    message(STATUS "fusedrl: ${CMAKE_CXX_COMPILER} has no libstdc++.so development link (it would copy libstdc++.a "
                   "into the extension); linking the process's runtime ${FUSEDRL_LIBSTDCXX} explicitly")
  endif()
endif()
