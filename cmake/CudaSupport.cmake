# Decides whether the CUDA kernels are built (FUSEDRL_WITH_CUDA), says why in one line either way, and sets
# TORCH_INCLUDE_DIRS / TORCH_LIBRARIES for the op library.
# CUDA is built only when all hold: FUSEDRL_CUDA is not OFF, torch is a CUDA build, nvcc is found, and the CUDA
# toolkit is usable by torch's own CMake config (a probe project, cmake/cuda_probe, configures with it and compiles
# one file that includes torch's CUDA headers). Otherwise the CPU extension is built against torch's libraries
# found from Python (FindTorchFromPython.cmake), which needs no CUDA toolkit even with a CUDA torch.
# FUSEDRL_CUDA=ON turns every "otherwise" into an error.
include(CheckLanguage)
set(FUSEDRL_WITH_CUDA OFF)
set(_fusedrl_cpu_reason "")
if(FUSEDRL_CUDA STREQUAL "OFF")
  set(_fusedrl_cpu_reason "FUSEDRL_CUDA=OFF")
elseif(NOT FUSEDRL_TORCH_CUDA_VERSION)
  set(_fusedrl_cpu_reason "torch ${FUSEDRL_TORCH_VERSION} is a CPU build (torch.version.cuda is None)")
else()
  if(NOT CMAKE_CUDA_COMPILER)  # a NOTFOUND from an earlier configure must not stick once nvcc is installed
    unset(CMAKE_CUDA_COMPILER CACHE)
  endif()
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_fusedrl_cpu_reason "torch has CUDA ${FUSEDRL_TORCH_CUDA_VERSION} but nvcc was not found (PATH, CUDACXX)")
  else()
    set(_fusedrl_probe_dir "${CMAKE_BINARY_DIR}/fusedrl_cuda_probe")
    file(REMOVE_RECURSE "${_fusedrl_probe_dir}")
    list(GET FUSEDRL_CUDA_ARCHS 0 _fusedrl_probe_arch)
    execute_process(
      COMMAND "${CMAKE_COMMAND}" -S "${CMAKE_CURRENT_LIST_DIR}/cuda_probe" -B "${_fusedrl_probe_dir}"
              -G "${CMAKE_GENERATOR}" "-DCMAKE_CUDA_COMPILER=${CMAKE_CUDA_COMPILER}"
              "-DCMAKE_CUDA_ARCHITECTURES=${_fusedrl_probe_arch}" "-DCMAKE_PREFIX_PATH=${FUSEDRL_TORCH_PREFIX}"
              "-DCMAKE_MAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}" "-DCMAKE_CXX_STANDARD=${CMAKE_CXX_STANDARD}"
      OUTPUT_VARIABLE _fusedrl_probe_log ERROR_VARIABLE _fusedrl_probe_log RESULT_VARIABLE _fusedrl_probe_rc)
    if(_fusedrl_probe_rc EQUAL 0)
      execute_process(COMMAND "${CMAKE_COMMAND}" --build "${_fusedrl_probe_dir}"
        OUTPUT_VARIABLE _fusedrl_probe_log ERROR_VARIABLE _fusedrl_probe_log RESULT_VARIABLE _fusedrl_probe_rc)
    endif()
    if(_fusedrl_probe_rc EQUAL 0)
      set(FUSEDRL_WITH_CUDA ON)
    else()
      string(REGEX MATCHALL "(Could NOT find|fatal error:)[^\n]*" _fusedrl_probe_errors "${_fusedrl_probe_log}")
      if(NOT _fusedrl_probe_errors)
        string(REGEX MATCHALL "CMake Error[^\n]*" _fusedrl_probe_errors "${_fusedrl_probe_log}")
      endif()
      list(REMOVE_DUPLICATES _fusedrl_probe_errors)
      list(SUBLIST _fusedrl_probe_errors 0 2 _fusedrl_probe_errors)
      string(REPLACE ";" " / " _fusedrl_probe_errors "${_fusedrl_probe_errors}")
      set(_fusedrl_cpu_reason "torch has CUDA ${FUSEDRL_TORCH_CUDA_VERSION} and nvcc is at ${CMAKE_CUDA_COMPILER}, "
          "but that CUDA toolkit is incomplete for torch's CMake/headers (${_fusedrl_probe_errors}; full log in "
          "${_fusedrl_probe_dir})")
      string(REPLACE ";" "" _fusedrl_cpu_reason "${_fusedrl_cpu_reason}")
    endif()
  endif()
endif()

if(FUSEDRL_WITH_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES "${FUSEDRL_CUDA_ARCHS}")
  # torch loads the shared CUDA runtime; a static copy in our library would be a second runtime with its own
  # error state and its own view of stream capture (CMake's default for nvcc-compiled targets is Static).
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  find_package(Torch REQUIRED)
  message(STATUS "fusedrl: building CUDA kernels for architectures ${FUSEDRL_CUDA_ARCHS} "
                 "(nvcc ${CMAKE_CUDA_COMPILER_VERSION}, torch ${FUSEDRL_TORCH_VERSION} CUDA ${FUSEDRL_TORCH_CUDA_VERSION})")
elseif(FUSEDRL_CUDA STREQUAL "ON")
  message(FATAL_ERROR "fusedrl: FUSEDRL_CUDA=ON but the CUDA kernels cannot be built: ${_fusedrl_cpu_reason}")
else()
  fusedrl_use_torch_from_python()
  message(STATUS "fusedrl: building the CPU-only extension: ${_fusedrl_cpu_reason}")
endif()
