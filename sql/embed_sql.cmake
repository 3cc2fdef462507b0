# cmake -DSQL_DIR=<dir of NNN_name.sql> -DOUT=<migrations.c> -P embed_sql.cmake
#
# Writes OUT: each migration as a NUL-terminated `static const char` array of hex bytes (so
# any byte, quote or backslash in the SQL survives), then fo_migrations[] sorted by version.
# Fails on a file name that is not NNN_name.sql or on two files with one version number.
if(NOT SQL_DIR OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DSQL_DIR=dir -DOUT=file.c -P embed_sql.cmake")
endif()

file(GLOB files ${SQL_DIR}/[0-9]*.sql)
list(SORT files COMPARE NATURAL)

set(body "")
set(table "")
set(count 0)
set(last_version -1)
foreach(path IN LISTS files)
  get_filename_component(fname ${path} NAME)
  if(NOT fname MATCHES "^([0-9]+)_([A-Za-z0-9_]+)\\.sql$")
    message(FATAL_ERROR "sql/${fname}: migrations are named NNN_name.sql (digits, '_', "
                        "letters, digits and '_')")
  endif()
  set(name ${CMAKE_MATCH_2})
  # "007" -> 7: strip leading zeros, keep one digit.
  string(REGEX REPLACE "^0+([0-9])" "\\1" version ${CMAKE_MATCH_1})
  if(version LESS_EQUAL last_version)
    message(FATAL_ERROR "sql/${fname}: version ${version} is used twice")
  endif()
  set(last_version ${version})

  file(READ ${path} hex HEX)
  # 16 bytes per line, then each byte as 0xNN.
  string(REGEX REPLACE "([0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f])"
         "\\1\n    " hex "${hex}")
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1, " hex "${hex}")
  string(REPLACE ", \n" ",\n" hex "${hex}")
  string(APPEND body "/* ${fname} */\nstatic const char sql_${version}[] = {\n    ${hex}0x00};\n\n")
  string(APPEND table "    {${version}, \"${name}\", sql_${version}},\n")
  math(EXPR count "${count} + 1")
endforeach()

set(content "/* Generated from sql/NNN_name.sql by sql/embed_sql.cmake at build time; do not edit. */
#include \"sql/migrations.h\"

${body}const fo_migration_t fo_migrations[] = {
${table}};

const size_t fo_migrations_count = ${count};
")

file(WRITE ${OUT} "${content}")
