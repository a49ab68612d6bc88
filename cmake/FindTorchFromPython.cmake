# What the Python interpreter that runs the build knows about its torch, asked once:
#   FUSEDRL_TORCH_VERSION, FUSEDRL_TORCH_CUDA_VERSION ('' for a CPU torch), FUSEDRL_TORCH_PREFIX (its CMake
#   config folder), FUSEDRL_TORCH_INCLUDE_DIRS, FUSEDRL_TORCH_LIBRARY_DIR, FUSEDRL_TORCH_CXX11_ABI (0 or 1).
# fusedrl_use_torch_from_python() sets TORCH_INCLUDE_DIRS / TORCH_LIBRARIES from these without torch's CMake
# config, whose find_package(Caffe2) demands a full CUDA toolkit whenever torch is a CUDA build, even for a CPU
# extension (the paths are the ones torch.utils.cpp_extension uses).
# Raises CMAKE_CXX_STANDARD to the one torch's headers need.
# Plain (non-cache) variables: a rebuild with another torch never sees stale values.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c [=[
import torch, torch.utils
from torch.utils import cpp_extension
print("VERSION=" + torch.__version__.split("+")[0])
print("CUDA_VERSION=" + (torch.version.cuda or ""))
print("PREFIX=" + torch.utils.cmake_prefix_path)
print("INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()))
print("LIBRARY_DIR=" + cpp_extension.library_paths()[0])
print("CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
]=]
  OUTPUT_VARIABLE _fusedrl_torch_facts ERROR_VARIABLE _fusedrl_torch_error RESULT_VARIABLE _fusedrl_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _fusedrl_torch_rc EQUAL 0)
  message(FATAL_ERROR "fusedrl: torch is not importable by ${Python3_EXECUTABLE}; install torch first and build "
                      "with `pip install --no-build-isolation .`\n${_fusedrl_torch_error}")
endif()
string(REPLACE "\n" ";" _fusedrl_torch_facts "${_fusedrl_torch_facts}")
foreach(_line IN LISTS _fusedrl_torch_facts)
  if(_line MATCHES "^([A-Z0-9_]+)=(.*)$")
    set(FUSEDRL_TORCH_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}")
  endif()
endforeach()
list(APPEND CMAKE_PREFIX_PATH "${FUSEDRL_TORCH_PREFIX}")

# The C++ standard torch's headers need: what its CMake config declares on its target (torch 2.14: 20; older: 17).
file(STRINGS "${FUSEDRL_TORCH_PREFIX}/Torch/TorchConfig.cmake" _fusedrl_torch_std REGEX "CXX_STANDARD [0-9]+")
if(_fusedrl_torch_std MATCHES "CXX_STANDARD ([0-9]+)" AND CMAKE_MATCH_1 GREATER CMAKE_CXX_STANDARD)
  message(STATUS "fusedrl: torch ${FUSEDRL_TORCH_VERSION} needs C++${CMAKE_MATCH_1}")
  set(CMAKE_CXX_STANDARD ${CMAKE_MATCH_1})
endif()

macro(fusedrl_use_torch_from_python)
  set(TORCH_INCLUDE_DIRS ${FUSEDRL_TORCH_INCLUDE_DIRS})
  set(TORCH_LIBRARIES)
  foreach(_lib torch torch_cpu c10)
    find_library(_fusedrl_lib_${_lib} ${_lib} PATHS "${FUSEDRL_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH NO_CACHE)
    if(NOT _fusedrl_lib_${_lib})
      message(FATAL_ERROR "fusedrl: lib${_lib} not found in ${FUSEDRL_TORCH_LIBRARY_DIR}")
    endif()
    list(APPEND TORCH_LIBRARIES "${_fusedrl_lib_${_lib}}")
  endforeach()
  add_compile_definitions(_GLIBCXX_USE_CXX11_ABI=${FUSEDRL_TORCH_CXX11_ABI})
endmacro()
