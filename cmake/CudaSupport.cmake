# Decides whether the CUDA kernels are built (FUSEDRL_WITH_CUDA) and says so either way.
# Needs FUSEDRL_TORCH_CUDA_VERSION from FindTorchFromPython.cmake; finds Torch afterwards, since Torch's
# CMake config needs the CUDA language enabled first when torch was built with CUDA.
include(CheckLanguage)
set(FUSEDRL_WITH_CUDA OFF)
if(NOT FUSEDRL_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND FUSEDRL_TORCH_CUDA_VERSION)
    set(CMAKE_CUDA_ARCHITECTURES "${FUSEDRL_CUDA_ARCHS}")
    # torch loads the shared CUDA runtime; a static copy in our library would be a second runtime with its own
    # error state and its own view of stream capture (CMake's default for nvcc-compiled targets is Static).
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(FUSEDRL_WITH_CUDA ON)
    message(STATUS "fusedrl: building CUDA kernels for architectures ${FUSEDRL_CUDA_ARCHS} "
                   "(nvcc ${CMAKE_CUDA_COMPILER_VERSION}, torch CUDA ${FUSEDRL_TORCH_CUDA_VERSION})")
  elseif(FUSEDRL_CUDA STREQUAL "ON")
    message(FATAL_ERROR "fusedrl: FUSEDRL_CUDA=ON but nvcc (${CMAKE_CUDA_COMPILER}) or a CUDA torch "
                        "(torch.version.cuda='${FUSEDRL_TORCH_CUDA_VERSION}') is missing")
  endif()
endif()
if(NOT FUSEDRL_WITH_CUDA)
  if(NOT FUSEDRL_TORCH_CUDA_VERSION)
    message(STATUS "fusedrl: torch has no CUDA: building the CPU-only extension")
  else()
    message(STATUS "fusedrl: nvcc not found or FUSEDRL_CUDA=OFF: building the CPU-only extension")
  endif()
endif()
find_package(Torch REQUIRED)
