/* Declarations shared by the files of relationships/ only. */
#ifndef FANOUT_REL_INT_H
#define FANOUT_REL_INT_H

#include "common/common.h"
#include "relationships/relationships.h"

/* Parses one binary int8 column value (network byte order). */
int64_t rel__int8_from_binary(const char *v);

#endif
